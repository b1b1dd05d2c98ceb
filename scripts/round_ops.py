"""Eager launches per greedy round of the compiled decoder, counted on the CPU (no GPU needed).

Inside a round's CUDA graph every aten op that runs outside a torch.compile'd region is a kernel of its own
(a few microseconds each on an H200, however little it computes); ops inside compiled regions fuse. This runs
one chain round, one tree round and one block of plain decoding of a tiny Llama target with a draft that has
EAGLE 3.1's norms (as the GPU recipe's does), compiled with inductor's CPU backend, under torch.profiler, and
counts the outermost aten ops that compute (views and casts left out), most frequent first. The ops that build
the dense form of a SlotMask (`cache_attention.dense_mask`) are counted apart: on a GPU `cache_attention` reads
the mask as it is, so the GPU's count is the total less those. `--where` lists each op with the decoder and
target functions it ran in.

  python scripts/round_ops.py [--spec-steps 5] [--tree 4,16] [--plain-block 4] [--where]
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
         "split_with_sizes", "result_type", "lift_fresh", "empty", "to", "detach_"}


def outermost(prof) -> list[tuple[str, list[str]]]:
    """(op, the specforge frames it ran under, innermost first) for each aten op that computes and runs under
    no other aten op or compiled region."""
    out = []
    for e in prof.events():
        if not e.name.startswith("aten::") or e.name[6:] in VIEWS:
            continue
        frames, parent, outer = [], e.cpu_parent, True
        while parent is not None:
            if parent.name.startswith("aten::") or "compiled" in parent.name.lower():
                outer = False
                break
            if "specforge" in parent.name:
                frames.append(parent.name.split("/")[-1])
            parent = parent.cpu_parent
        if outer:
            out.append((e.name[6:], frames))
    return out


def profiled(fn, *args) -> list[tuple[str, list[str]]]:
    for _ in range(3):  # compiles, recompiles
        fn(*args)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        fn(*args)
    return outermost(prof)


def round_ops(dec: SpecDecoder, n: int = 20) -> list[tuple[str, list[str]]]:
    w = dec.path_rows
    g = torch.Generator().manual_seed(0)
    state = (torch.tensor([n]), torch.randn(w, dec.draft.fc.in_features, generator=g),
             torch.randint(0, 256, (w,), generator=g), torch.tensor([max(1, w // 2)]))
    dec._fit(dec.round_slots(n))
    return profiled(dec._chain_round if dec.topk == 1 else dec._tree_round, *state)


def plain_ops(dec: SpecDecoder, block: int, n: int = 20) -> list[tuple[str, list[str]]]:
    dec._fit(n + block)
    return profiled(lambda: dec._plain_steps(torch.tensor([5]), torch.tensor([n]), block))


def cpu_only(frames: list[str]) -> bool:
    """An op of the dense mask a SlotMask becomes on the CPU (`cache_attention.dense_mask`)."""
    return any("dense_mask" in f for f in frames)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec-steps", type=int, default=5)
    ap.add_argument("--tree", default="4,16", help="topk,num_draft_tokens")
    ap.add_argument("--plain-block", type=int, default=4, help="plain decoding tokens per replay")
    ap.add_argument("--where", action="store_true", help="list each eager op with the functions it ran in")
    args = ap.parse_args()
    k, t = (int(x) for x in args.tree.split(","))
    model = build("llama").float()
    draft = tiny_draft(model, draft_vocab=256, std=0.05, fc_norm=True, norm_output=True).requires_grad_(False)
    rows = []
    for name, topk, tokens in ((f"chain S={args.spec_steps}", 1, None), (f"tree S={args.spec_steps} {k}/{t}", k, t)):
        dec = SpecDecoder(model, draft, [1, 3, 5], max_len=96, spec_steps=args.spec_steps, topk=topk,
                          num_draft_tokens=tokens, compile=True, span_step=1024)
        rows.append((name, round_ops(dec)))
    rows.append((f"plain decoding, a block of {args.plain_block}", plain_ops(dec, args.plain_block)))
    print("| call | eager ops that compute | of which the CPU's dense mask | on a GPU | most frequent there |")
    print("|---|---|---|---|---|")
    for name, ops in rows:
        gpu = collections.Counter(op for op, frames in ops if not cpu_only(frames))
        print(f"| {name} | {len(ops)} | {len(ops) - sum(gpu.values())} | {sum(gpu.values())} | "
              f"{', '.join(f'{o} {c}' for o, c in gpu.most_common(6))} |")
    if args.where:
        for name, ops in rows:
            print(f"\n{name}:")
            for op, frames in ops:
                if not cpu_only(frames):
                    print(f"  {op:14s} {' <- '.join(frames[:3])}")


if __name__ == "__main__":
    main()
