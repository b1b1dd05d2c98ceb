"""Eager launches per greedy round of the compiled decoder, counted on the CPU (no GPU needed).

Inside a round's CUDA graph every aten op that runs outside a torch.compile'd region is a kernel of its own
(a few microseconds each on an H200, however little it computes); ops inside compiled regions fuse. This runs
one chain round and one tree round of a tiny Llama target with a draft that has EAGLE 3.1's norms (as the GPU
recipe's does), compiled with inductor's CPU backend, under torch.profiler, and counts the outermost aten ops
that compute (views and casts left out), most frequent first.

  python scripts/round_ops.py [--spec-steps 5] [--tree 4,16]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specforge.eagle3.decoder import SpecDecoder  # noqa: E402
from tests.conftest import tiny_draft  # noqa: E402
from tests.test_static_target import build  # noqa: E402

VIEWS = {"select", "slice", "alias", "unsqueeze", "reshape", "view", "expand", "flatten", "t", "transpose",
         "promote_types", "as_strided", "squeeze", "detach", "_unsafe_view", "split", "chunk", "narrow", "permute",
         "split_with_sizes", "result_type", "lift_fresh", "empty", "to"}


def eager_ops(dec: SpecDecoder, n: int = 20) -> collections.Counter:
    w = dec.path_rows
    g = torch.Generator().manual_seed(0)
    state = (torch.tensor([n]), torch.randn(w, dec.draft.fc.in_features, generator=g),
             torch.randint(0, 256, (w,), generator=g), torch.tensor([max(1, w // 2)]))
    fn = dec._chain_round if dec.topk == 1 else dec._tree_round
    dec._fit(dec.round_slots(n))
    for _ in range(3):  # compiles, recompiles
        fn(*state)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*state)
    return collections.Counter(e.name[6:] for e in prof.events()
                               if e.cpu_parent is None and e.name.startswith("aten::") and e.name[6:] not in VIEWS)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec-steps", type=int, default=5)
    ap.add_argument("--tree", default="4,16", help="topk,num_draft_tokens")
    args = ap.parse_args()
    k, t = (int(x) for x in args.tree.split(","))
    model = build("llama").float()
    draft = tiny_draft(model, draft_vocab=256, std=0.05, fc_norm=True, norm_output=True).requires_grad_(False)
    print("| round | eager ops that compute | most frequent |")
    print("|---|---|---|")
    for name, topk, tokens in ((f"chain S={args.spec_steps}", 1, None), (f"tree S={args.spec_steps} {k}/{t}", k, t)):
        dec = SpecDecoder(model, draft, [1, 3, 5], max_len=96, spec_steps=args.spec_steps, topk=topk,
                          num_draft_tokens=tokens, compile=True, span_step=1024)
        ops = eager_ops(dec)
        print(f"| {name} | {sum(ops.values())} | {', '.join(f'{o} {c}' for o, c in ops.most_common(6))} |")


if __name__ == "__main__":
    main()
