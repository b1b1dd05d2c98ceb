"""Where a trained draft misses the target's greedy token, and why (issue 14, item 9).

The target answers real prompts greedily (the bundled bench set by default: what `specforge bench` decodes),
then the draft is unrolled over those answers exactly as in training-time test and each of its steps is
compared with the target's argmax. Every scored position is tagged with the target's own confidence there
(top-1 probability, top-1 minus top-2) and its place in the answer, and the tables split the draft's
accuracy by those tags:

- if the misses sit where the target itself is unsure (top-1 below 0.5), a small target's flat
  distributions limit acceptance and more data buys little there; the draft's top-4 hit rate then says what
  a tree can still win;
- if the draft also misses where the target is sure, its capacity or data limit it;
- "not in draft vocab" counts misses no draft of this vocabulary can avoid. `--vocab-counts` (the
  `vocab.safetensors` that training or `specforge build-vocab` writes, whose token counts come from the
  training data) with `--vocab-sizes` says how many of those a larger draft vocab, built from the same counts,
  would hold: the most a larger vocab can buy at step 0.

  python scripts/miss_analysis.py --config configs/recipes/smollm2-gpu.yaml --draft outputs/smollm2-gpu/draft
  python scripts/miss_analysis.py --target smollm2-135m --draft DIR --prompts my_prompts.jsonl --limit 40
  python scripts/miss_analysis.py --config C --draft DIR --vocab-counts OUT/vocab.safetensors --vocab-sizes 16384,32768

Runs on the CPU (float32) or a GPU. Prints markdown tables; `--json FILE` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specforge.config import load_config  # noqa: E402
from specforge.data.batching import collate  # noqa: E402
from specforge.data.conversations import bundled_path  # noqa: E402
from specforge.data.regenerate import regenerate  # noqa: E402
from specforge.data.tables import from_conversations, read_prompts  # noqa: E402
from specforge.data.template import ensure_chat_template, tokenize_table  # noqa: E402
from specforge.eagle3.checkpoint import load_draft  # noqa: E402
from specforge.eagle3.ttt import next_token_mask, step_mask, ttt_unroll  # noqa: E402
from specforge.prepare import answerer  # noqa: E402
from specforge.targets import (FeatureCapture, TargetHead, aux_layer_ids, decoder_parts, load_target,  # noqa: E402
                               text_config)

P1_EDGES = [0.0, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0001]
MARGIN_EDGES = [0.0, 0.05, 0.15, 0.3, 0.6, 1.0001]
POS_EDGES = [0, 8, 32, 64, 128, 10 ** 9]


def answer_position(loss_mask: torch.Tensor) -> torch.Tensor:
    """[T]: for each token, its index inside its run of assistant tokens (0 at an answer's first token)."""
    pos = torch.zeros_like(loss_mask, dtype=torch.long)
    run = 0
    for t, m in enumerate(loss_mask.tolist()):
        run = run + 1 if m else 0
        pos[t] = run - 1
    return pos


@torch.no_grad()
def position_records(target, capture, head, draft, sample, steps: int, device) -> dict:
    """Per scored position t of one conversation (the draft's step 0 predicts token t+2 from the features at
    t and token t+1): the target's confidence in token t+2, the answer index of that token, and per step k
    whether the draft's argmax (and top-4) equals the target's argmax at t+1+k."""
    batch = collate([sample]).to(device)
    f = capture.run(batch.input_ids, batch.attention_mask)
    probs = torch.softmax((f.final[0] @ head.lm_head_weight.t()).float(), -1)  # [T, V]
    top2 = probs.topk(2, dim=-1)
    tgt_arg = top2.indices[:, 0]
    pred = next_token_mask(batch.loss_mask)[0]  # target at p predicts an assistant token p+1
    ans_pos = answer_position(batch.loss_mask[0])
    t0 = step_mask(pred[None], 0)[0].nonzero(as_tuple=True)[0]  # the positions step 0 scores
    want0 = tgt_arg[t0 + 1]
    rows = {"p1": top2.values[t0 + 1, 0], "margin": top2.values[t0 + 1, 0] - top2.values[t0 + 1, 1],
            "answer_pos": ans_pos[t0 + 2],  # t0 + 2 is an assistant token, so inside the row
            "in_vocab": draft.t2d[want0], "want": want0}
    # Streak from step 0 at each scored position: consecutive steps whose argmax matched (a chain's acceptance,
    # where each step is only scored while the one before it could be).
    streak = torch.zeros(t0.numel(), dtype=torch.long, device=device)
    alive = torch.ones(t0.numel(), dtype=torch.bool, device=device)
    for k, hidden in ttt_unroll(draft, batch.input_ids, f.aux.to(draft.fc.weight.dtype), steps, "reference"):
        t = step_mask(pred[None], k)[0].nonzero(as_tuple=True)[0]
        top = draft.draft_to_target(draft.logits(hidden[0, t]).float().topk(4 if k == 0 else 1, dim=-1).indices)
        hit = torch.zeros(pred.shape[0], dtype=torch.bool, device=device)
        hit[t] = top[:, 0] == tgt_arg[t + 1 + k]
        if k == 0:
            rows["hit"], rows["hit4"] = hit[t0], (top == want0[:, None]).any(-1)
        alive = alive & hit[t0]
        streak += alive.long()
    rows["streak"] = streak
    return {k: v.cpu() for k, v in rows.items()}


def table(rec: dict, key: str, edges: list, label: str, fmt: str) -> tuple[str, list]:
    x = rec[key].double() if key != "answer_pos" else rec[key]
    lines = [f"| {label} | share of positions | draft top-1 = target | draft top-4 hit | chain accept length "
             f"(S=5, from here) | target argmax outside draft vocab |", "|---|---|---|---|---|---|"]
    out = []
    n_all = len(x)
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (x >= lo) & (x < hi)
        n = int(sel.sum())
        if n == 0:
            continue
        row = {"bucket": [lo, hi], "share": n / n_all, "acc0": float(rec["hit"][sel].float().mean()),
               "top4": float(rec["hit4"][sel].float().mean()),
               "accept_len": 1 + float(rec["streak"][sel].clamp(max=5).float().mean()),
               "out_of_vocab": 1 - float(rec["in_vocab"][sel].float().mean())}
        out.append(row)
        hi_s = "1" if hi > 1 and key != "answer_pos" else (fmt.format(hi) if hi < 10 ** 8 else "end")
        lines.append(f"| {fmt.format(lo)}-{hi_s} | {row['share']:.3f} | {row['acc0']:.3f} | {row['top4']:.3f} | "
                     f"{row['accept_len']:.2f} | {row['out_of_vocab']:.3f} |")
    return "\n".join(lines), out


def vocab_table(rec: dict, counts: torch.Tensor, sizes: list[int], current: int) -> tuple[str, list]:
    """Step 0's target argmax outside a draft vocab of each size built from `counts` (`build_vocab`, as training
    builds it): over all positions, where the target is at least 95% sure, and among the draft's misses."""
    from specforge.data.vocab import build_vocab

    sure, miss = rec["p1"] >= 0.95, ~rec["hit"]
    lines = ["| draft vocab | outside, all positions | outside, target p1 >= 0.95 | share of step-0 misses outside |",
             "|---|---|---|---|"]
    out = []
    for n in sorted({current, *sizes}):
        inside = build_vocab(counts, n)[1][rec["want"]]
        row = {"size": n, "all": 1 - float(inside.double().mean()), "sure": 1 - float(inside[sure].double().mean()),
               "misses": float((~inside & miss).sum()) / max(1, int(miss.sum()))}
        out.append(row)
        lines.append(f"| {n:,}{' (this draft)' if n == current else ''} | {row['all']:.3f} | {row['sure']:.3f} | "
                     f"{row['misses']:.3f} |")
    return "\n".join(lines), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--draft", default=None, help="serving-format draft folder (default: <out_dir>/draft)")
    ap.add_argument("--prompts", default=None, help="JSONL prompts (default: the bundled bench prompts)")
    ap.add_argument("--limit", type=int, default=None, help="only the first n prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--vocab-counts", default=None, help="vocab.safetensors with the training data's token counts")
    ap.add_argument("--vocab-sizes", default="16384,32768", help="draft vocab sizes to check with --vocab-counts")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.target, args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    target, tok = load_target(cfg.target, device, torch.float32)
    ensure_chat_template(tok, cfg.data.chat_template)
    draft_dir = Path(args.draft) if args.draft else cfg.output_dir() / "draft"
    draft = load_draft(draft_dir, decoder_parts(target)[0], dtype=torch.float32, device=device,
                       num_target_layers=text_config(target.config).num_hidden_layers).eval()
    ids = draft.config.eagle_aux_hidden_state_layer_ids or aux_layer_ids(cfg.target, target)

    t0 = time.perf_counter()
    prompts = args.prompts or str(bundled_path("bench_prompts.jsonl"))
    convs = read_prompts(prompts, cfg.data, "--prompts")[: args.limit]
    pc = cfg.prepare
    pc.temperature, pc.samples, pc.max_new_tokens = 0.0, 1, args.max_new_tokens
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    answered = regenerate(convs, answerer(target, tok, pc, pad), 1)
    samples = tokenize_table(tok, from_conversations(answered, prompts), cfg.data)
    print(f"{len(samples)} conversations from {prompts} answered greedily by {cfg.target.name} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    capture, head = FeatureCapture(target, ids), TargetHead.from_model(target)
    parts = [position_records(target, capture, head, draft, s, args.steps, device) for s in samples]
    capture.remove()
    rec = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    n = len(rec["hit"])
    summary = {"positions": n, "acc0": float(rec["hit"].float().mean()), "top4": float(rec["hit4"].float().mean()),
               "accept_len": 1 + float(rec["streak"].clamp(max=5).float().mean()),
               "out_of_vocab": 1 - float(rec["in_vocab"].float().mean()),
               "target_p1_mean": float(rec["p1"].mean()), "share_p1_below_0.5": float((rec["p1"] < 0.5).float().mean())}
    print(f"\n{cfg.target.name}, draft {draft_dir}, {n} scored positions: draft top-1 = target {summary['acc0']:.3f}, "
          f"top-4 hit {summary['top4']:.3f}, chain accept length (S={args.steps}, teacher-forced) "
          f"{summary['accept_len']:.2f}; target top-1 below 0.5 at {summary['share_p1_below_0.5']:.3f} of "
          f"positions; target argmax outside the draft vocab {summary['out_of_vocab']:.3f}\n")
    result = {"summary": summary, "target": cfg.target.name, "draft": str(draft_dir), "prompts": prompts}
    for key, edges, label, fmt in (("p1", P1_EDGES, "target top-1 prob", "{:.2f}"),
                                   ("margin", MARGIN_EDGES, "target top-1 minus top-2", "{:.2f}"),
                                   ("answer_pos", POS_EDGES, "token index in the answer", "{}")):
        text, rows = table(rec, key, edges, label, fmt)
        print(text + "\n")
        result[key] = rows
    if args.vocab_counts:
        from safetensors.torch import load_file

        counts = load_file(args.vocab_counts)["counts"]
        if counts.numel() != draft.t2d.numel():
            raise SystemExit(f"{args.vocab_counts}: counts for {counts.numel()} tokens, the target has "
                             f"{draft.t2d.numel()}")
        sizes = [int(x) for x in args.vocab_sizes.split(",") if x]
        text, result["vocab"] = vocab_table(rec, counts, sizes, int(draft.config.draft_vocab_size))
        print(f"Step 0's target argmax against draft vocabs built from {args.vocab_counts}:\n{text}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
