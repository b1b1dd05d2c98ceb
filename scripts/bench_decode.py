"""Step costs of speculative decoding on a GPU: the numbers that bound its speedup.

Prints one table per target: the target's decode step (1 token over a static KV cache, replayed from a
CUDA graph) against its weight-read floor, the verify step of S+1 (chain) and T (tree) tokens against
the decode step, and the draft's steps against the target step. With the theory of eagle3.md,
speedup ~ acceptance_length / (1 + S*c + v), c = draft step / target step, v = verify / decode - 1.

  python scripts/bench_decode.py --shape llama3.1-8b            # random weights of the real shape
  python scripts/bench_decode.py --shape llama4-scout --layers 8  # Scout's layers, fewer of them
  python scripts/bench_decode.py --target smollm2-135m --draft outputs/smollm2-135m/draft
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from specforge.config import load_config
from specforge.eagle3.checkpoint import load_draft
from specforge.eagle3.decoder import SpecDecoder
from specforge.eagle3.draft import Eagle3Draft, draft_config, init_draft_weights
from specforge.kernels.batch_invariant import batch_invariant
from specforge.model_shapes import random_target
from specforge.targets import aux_layer_ids, decoder_parts, load_target, text_config


def time_ms(fn, iters=50, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), iters=20)
    return 2 * x.numel() / (ms / 1e3)


def build(args):
    dev = torch.device("cuda")
    if args.shape:
        target = random_target(args.shape, dev, torch.bfloat16, num_layers=args.layers)
        depth = [f"target.aux_layer_ids=[1,{args.layers // 2},{args.layers - 1}]"] if args.layers else []
        cfg = load_config(args.shape, overrides=depth)
        ids = aux_layer_ids(cfg.target, target)
        embed = decoder_parts(target)[0]
        dcfg = draft_config(target.config, cfg.target.draft, embed.weight.shape[0], ids)
        draft = Eagle3Draft(dcfg, embed)
        init_draft_weights(draft, seed=0)
        return args.shape, target, draft.to(dev, torch.bfloat16), ids
    cfg = load_config(args.target, overrides=["device=cuda"])
    target, _ = load_target(cfg.target, dev)
    embed = decoder_parts(target)[0]
    draft = load_draft(args.draft, embed, dtype=torch.bfloat16, device=dev,
                       num_target_layers=text_config(target.config).num_hidden_layers)
    return cfg.target.name, target, draft, draft.config.eagle_aux_hidden_state_layer_ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default=None)
    ap.add_argument("--layers", type=int, default=None, help="with --shape: fewer layers (llama4-scout fits one GPU)")
    ap.add_argument("--target", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--spec-steps", type=int, default=5)
    ap.add_argument("--tree", default="4,16", help="topk,num_draft_tokens for the tree verify row")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--json", default=None)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (to see what they buy)")
    ap.add_argument("--deterministic", action="store_true", help="the batch-invariant kernels (bench.deterministic)")
    ap.add_argument("--matmul", choices=["decode", "train"], default="decode",
                    help="with --deterministic: the matmul setting (decode: K split; train: wide tiles, no split)")
    args = ap.parse_args()
    with batch_invariant(args.deterministic, training=args.matmul == "train"):
        step_costs(args)


def step_costs(args):
    name, target, draft, ids = build(args)
    s = args.spec_steps
    k, t_nodes = (int(x) for x in args.tree.split(","))
    bw = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    dec = SpecDecoder(target, draft, ids, max_len=args.context + 64, spec_steps=s, cuda_graphs=not args.eager)
    n = args.context
    dev = dec.device
    rows = {}

    def target_step(tokens):
        toks = torch.randint(0, 1000, (tokens,), device=dev)
        pos = n + torch.arange(tokens, device=dev)
        mask = dec._prefix_mask(tokens, n, dec.target.k_cache.shape[3])
        mask[:, n:n + tokens] = torch.ones(tokens, tokens, dtype=torch.bool, device=dev).tril()
        return lambda: dec._target(toks, pos, pos, mask)

    rows["target decode step (1 token)"] = time_ms(target_step(1))
    rows[f"target verify, chain (S+1={s + 1} tokens)"] = time_ms(target_step(s + 1))
    chain_dec = dec
    # A decoder set up for the tree, so that its T-token verify is captured too.
    dec = SpecDecoder(target, draft, ids, max_len=args.context + 64, spec_steps=s, topk=k, num_draft_tokens=t_nodes,
                      cuda_graphs=not args.eager)
    rows[f"target verify, tree (T={t_nodes} tokens)"] = time_ms(target_step(t_nodes))
    dec = chain_dec
    hid = torch.randn(1, draft.config.hidden_size, device=dev, dtype=torch.bfloat16)

    def draft_step(rows_):
        toks = torch.randint(0, 1000, (rows_,), device=dev)
        pos = torch.full((rows_,), n, device=dev)
        slots = n + torch.arange(rows_, device=dev)
        mask = dec._prefix_mask(rows_, n + rows_, dec.draft_slots)
        h = hid.expand(rows_, -1)[None]

        def run():
            out = dec._run(("draft_step", rows_), lambda *a: dec._draft(*a)[0], toks, h, pos, slots, mask)
            return torch.log_softmax(draft.logits(out).float(), -1).topk(max(1, k), dim=-1)

        return run

    def draft_prefill(length):
        aux = torch.randn(length, 3 * draft.config.hidden_size, device=dev, dtype=torch.bfloat16)
        toks = torch.randint(0, 1000, (length,), device=dev)
        return lambda: dec._draft_prefill(aux, toks, n - length, n)

    rows["draft step, chain (1 token + lm_head + top-k)"] = time_ms(draft_step(1))
    rows[f"draft step, tree ({k} tokens + lm_head + top-k)"] = time_ms(draft_step(k))
    rows[f"draft prefill of accepted tokens ({s + 1})"] = time_ms(draft_prefill(s + 1))
    floor = weight_bytes / bw * 1e3
    dec_ms = rows["target decode step (1 token)"]
    c = rows["draft step, chain (1 token + lm_head + top-k)"] / dec_ms
    v = rows[f"target verify, chain (S+1={s + 1} tokens)"] / dec_ms - 1
    prefill = rows[f"draft prefill of accepted tokens ({s + 1})"] / dec_ms
    mode = ("eager" if args.eager else "CUDA graphs") + (f", deterministic switch on ({args.matmul} matmul setting)" if args.deterministic else "")
    print(f"\n## {name}: {torch.cuda.get_device_name()}, bf16, context {n}, {mode}")
    print(f"weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bw / 1e12:.2f} TB/s, weight-read floor {floor:.3f} ms")
    print("| step | ms | vs decode step |")
    print("|---|---|---|")
    for key, ms in rows.items():
        print(f"| {key} | {ms:.3f} | {ms / dec_ms:.2f} |")
    print(f"| weight-read floor of the decode step | {floor:.3f} | {floor / dec_ms:.2f} |")
    print(f"\nc = {c:.3f}, v = {v:.3f}, draft prefill = {prefill:.3f} decode steps")
    for al in (2.0, 3.0, 4.0):
        print(f"speedup bound at acceptance length {al}: {al / (1 + s * c + v + prefill):.2f}x "
              f"(S={s}, counting the draft prefill)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"name": name, "device": torch.cuda.get_device_name(), "rows": rows, "floor_ms": floor,
                       "c": c, "v": v, "prefill": prefill, "bandwidth": bw}, f, indent=2)


if __name__ == "__main__":
    main()
