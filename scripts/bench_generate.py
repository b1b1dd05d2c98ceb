"""Answering speed of prepare-data: the batched static-cache generator (specforge/generate.py) against the loop
it replaced (HF forward with its dynamic cache, left padded, reimplemented below as it was), on the same
prompts, target and precision. Prints answers/s and tokens/s for each, and how many greedy answers agree.

    python scripts/bench_generate.py                               # embedded default, bundled train prompts
    python scripts/bench_generate.py --limit 64 --old-batch 32      # a CPU-sized subset
    python scripts/bench_generate.py --old-batch 512 --copies 8     # an H200 (new batch: automatic)
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specforge.config import load_config  # noqa: E402
from specforge.data.conversations import bundled_path, read_jsonl  # noqa: E402
from specforge.data.template import ensure_chat_template, prompt_ids  # noqa: E402
from specforge.generate import Request, generate, request_key, stop_ids  # noqa: E402
from specforge.targets import load_target, resolve_device, resolve_dtype  # noqa: E402


@torch.no_grad()
def old_loop(model, encoded, max_new_tokens, temperature, seed, batch_size, eos_id, pad_id) -> list[list[int]]:
    """prepare-data's loop before specforge/generate.py: sorted by length, left padded, one HF forward per
    token over the dynamic cache, the host checking after every token whether all rows hit EOS."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out_all = [None] * len(encoded)
    gen = torch.Generator(device=device).manual_seed(seed)
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        t = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
        att = torch.zeros(len(idx), t, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, t - len(encoded[i]):] = torch.tensor(encoded[i])
            att[r, t - len(encoded[i]):] = 1
        ids, att = ids.to(device), att.to(device)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
        cache = getattr(out, cache_key)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        tokens = []
        logits = out.logits[:, -1].float()
        next_pos = pos[:, -1:] + 1
        for _ in range(max_new_tokens):
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            tokens.append(nxt)
            done |= nxt == eos_id
            if bool(done.all()):
                break
            att = torch.cat([att, (~done).long()[:, None] | 1], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=next_pos, use_cache=True,
                        **{cache_key: cache})
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        for r, row in enumerate(torch.stack(tokens, dim=1).tolist()):
            out_all[idx[r]] = row[:row.index(eos_id)] if eos_id in row else row
    return out_all


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="preset or checkpoint folder (default: the embedded default)")
    ap.add_argument("--prompts", default=None, help="JSONL of prompts (default: the bundled train prompts)")
    ap.add_argument("--limit", type=int, default=None, help="only the first n prompts")
    ap.add_argument("--copies", type=int, default=1,
                    help="each prompt this many times (a bigger workload; sampled copies differ)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--old-batch", type=int, default=32, help="batch of the old loop (0: skip it)")
    ap.add_argument("--new-batch", type=int, default=None, help="batch of the new generator (default: auto)")
    ap.add_argument("--no-graphs", action="store_true", help="new generator eager on a GPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.target)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok = load_target(cfg.target, device, dtype)
    ensure_chat_template(tok)
    convs = list(read_jsonl(args.prompts or bundled_path("train_prompts.jsonl")))[: args.limit]
    firsts = [c.messages[:next(i for i, m in enumerate(c.messages) if m["role"] == "user") + 1] for c in convs]
    encoded = [prompt_ids(tok, m) for m in firsts] * args.copies  # first turns (what prepare-data answers first)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = stop_ids(tok, model)
    rows, outputs = [], {}
    runs = [("new (static cache" + (", eager)" if args.no_graphs or device.type != "cuda" else ", CUDA graphs)"),
             args.new_batch)]
    if args.old_batch:
        runs.insert(0, ("old (HF dynamic cache)", args.old_batch))
    for name, batch in runs:
        _sync(device)
        t0 = time.perf_counter()
        if name.startswith("old"):
            outs = old_loop(model, encoded, args.max_new_tokens, args.temperature, 0, batch, tok.eos_token_id, pad)
        else:
            reqs = [Request(e, args.temperature, request_key("bench", i)) for i, e in enumerate(encoded)]
            outs = [g.tokens for g in generate(model, reqs, args.max_new_tokens, stop, pad, batch_size=batch,
                                               cuda_graphs=not args.no_graphs, desc=name)]
        _sync(device)
        sec = time.perf_counter() - t0
        outputs[name] = outs
        n_tok = sum(len(o) for o in outs)
        rows.append((name, batch or "auto", len(outs), sec, len(outs) / sec, n_tok / sec, n_tok / len(outs)))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\n{cfg.target.name}, {dtype}, {device} ({where}), "
          f"{'greedy' if args.temperature <= 0 else f'T={args.temperature}'}, max {args.max_new_tokens} new tokens, "
          f"torch {torch.__version__}")
    print("| loop | batch | answers | seconds | answers/s | tokens/s | tokens/answer |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, batch, n, sec, aps, tps, tpa in rows:
        print(f"| {name} | {batch} | {n} | {sec:.1f} | {aps:.2f} | {tps:.0f} | {tpa:.1f} |")
    if len(rows) == 2:
        print(f"speedup (answers/s): {rows[1][4] / rows[0][4]:.2f}x")
        if args.temperature <= 0:
            a, b = outputs.values()
            same = sum(x == y for x, y in zip(a, b))
            print(f"identical greedy answers: {same} of {len(a)} (bf16 rounding differs between the two forwards)")


if __name__ == "__main__":
    main()
