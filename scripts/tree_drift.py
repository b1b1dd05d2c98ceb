"""Where a tree verify's bits part from plain decoding's (issue 15: on the H200 the default path's tree outputs
differ from plain greedy in about half the turns, the chain's in none).

One verify of a tree of T tokens over a cache of `--context` random tokens, then, for every node, decode steps
along its path (root to node) over the same cache, through the static target the decoder uses: its kernels
(skinny linear, cache attention) wherever they serve, eagerly or compiled (`--compile`), no CUDA graphs. A
greedy tree round is exact only if each node's logits in the verify equal, bit for bit, those its last decode
step gives. Printed per kind of node (its ancestors in consecutive cache slots, as a chain has them, or not):
how many have each aux layer's input (the features) and the logits equal to the decode steps', and the largest
differences. Features apart: the layers (the attention reads a node's ancestors from other slots than plain
decoding does, so it may sum them in another order). Features equal, logits apart: the head.

  python scripts/tree_drift.py --shape smollm2-135m                    # random weights of a real shape, a GPU
  python scripts/tree_drift.py --target smollm2-135m --compile         # the real target, compiled as decoding
  python scripts/tree_drift.py --target smollm2-135m --device cpu      # the CPU path (dense masks)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specforge.config import load_config  # noqa: E402
from specforge.layers import SlotMask  # noqa: E402
from specforge.model_shapes import random_target  # noqa: E402
from specforge.static_target import StaticTarget  # noqa: E402
from specforge.targets import aux_layer_ids, load_target  # noqa: E402


def random_tree(nodes: int, topk: int, gen: torch.Generator) -> list[int]:
    """Parents (-1 at the root) of a tree laid out depth by depth, as the decoder lays out its trees: each depth
    takes up to `topk` children of up to `topk` nodes of the depth before, drawn at random."""
    parents, depth_nodes = [-1], [0]
    while len(parents) < nodes:
        chosen = [depth_nodes[i] for i in torch.randperm(len(depth_nodes), generator=gen)[:topk].tolist()]
        nxt = []
        for p in sorted(chosen):
            for _ in range(topk):
                if len(parents) < nodes:
                    nxt.append(len(parents))
                    parents.append(p)
        depth_nodes = nxt
    return parents


def paths(parents: list[int]) -> list[list[int]]:
    """Each node's path from the root (tree indices, root first)."""
    out = []
    for i in range(len(parents)):
        path, j = [], i
        while j >= 0:
            path.append(j)
            j = parents[j]
        out.append(path[::-1])
    return out


@torch.no_grad()
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", help="random weights of a real shape (specforge.model_shapes)")
    ap.add_argument("--target", help="a configs/targets preset or an HF folder")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--context", type=int, default=150, help="cache tokens before the tree")
    ap.add_argument("--tree", default="4,16", help="topk,nodes")
    ap.add_argument("--trees", type=int, default=4, help="random trees (each at a longer context)")
    ap.add_argument("--compile", action="store_true", help="the compiled layers and head, as decoding runs them")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (as decoding runs), or float64 (a check of this "
                    "script: the verify and the decode steps then agree to rounding)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.shape or args.target):
        ap.error("--shape or --target")
    dev = torch.device(args.device)
    cfg = load_config(args.shape or args.target, overrides=[f"device={dev.type}"])
    dtype = getattr(torch, args.dtype)
    if args.shape:
        model = random_target(args.shape, dev, dtype)
    else:
        model, _ = load_target(cfg.target, dev, dtype)
    aux = aux_layer_ids(cfg.target, model)
    k, t = (int(x) for x in args.tree.split(","))
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    static = StaticTarget(model, aux, args.context + args.trees * 64 + t + 8)
    if args.compile:
        static.compile()
    eager = not args.compile
    # Per kind of node (True: its ancestors in consecutive slots, as a chain's are).
    stats = {chain: {"count": 0, "features_equal": 0, "logits_equal": 0, "max_diff_features": 0.0,
                     "max_diff_logits": 0.0} for chain in (True, False)}
    for r in range(args.trees):
        n = args.context + 64 * r  # each tree at another place within its 64-slot ranges
        prompt = torch.randint(0, vocab, (1, n), generator=gen).to(dev)
        idx = torch.arange(n, device=dev)
        static(prompt, idx[None], idx, torch.ones(n, n, dtype=torch.bool, device=dev).tril()[None], eager=eager)
        parents = random_tree(t, k, gen)
        where = paths(parents)
        tokens = torch.randint(0, vocab, (t,), generator=gen).to(dev)
        depth = torch.tensor([len(p) - 1 for p in where], device=dev)
        ancestors = torch.zeros(t, t, dtype=torch.bool)
        for i, p in enumerate(where):
            ancestors[i, p] = True
        prefix = torch.tensor([n], device=dev)
        logits_v, aux_v = static(tokens[None], (n + depth)[None], n + torch.arange(t, device=dev),
                                 SlotMask(prefix, ancestors.to(dev), n + t), eager=eager)
        one = torch.ones(1, 1, dtype=torch.bool, device=dev)
        for i, p in enumerate(where):
            for j, node in enumerate(p):  # decode steps along the path: slot and position n + j
                at = torch.tensor([n + j], device=dev)
                logits_d, aux_d = static(tokens[node].reshape(1, 1), at[None], at, SlotMask(at, one, n + j + 1),
                                         eager=eager)
            s = stats[p == list(range(len(p)))]
            s["count"] += 1
            for name, d, v in (("features", aux_d, aux_v), ("logits", logits_d, logits_v)):
                s[f"{name}_equal"] += bool(torch.equal(d[0, 0], v[0, i]))
                diff = float((d[0, 0].float() - v[0, i].float()).abs().max())
                s[f"max_diff_{name}"] = max(s[f"max_diff_{name}"], diff)
    name = args.shape or args.target
    print(f"\n## Tree verify against decode steps: {name}, {dev.type}"
          f"{' (' + torch.cuda.get_device_name() + ')' if dev.type == 'cuda' else ''}, {args.dtype}, "
          f"{'compiled' if args.compile else 'eager'}, {args.trees} random trees of {t} nodes (topk {k}), "
          f"contexts {args.context}..{args.context + 64 * (args.trees - 1)}\n")
    print("| nodes | count | features equal | logits equal | max abs diff features | max abs diff logits |")
    print("|---|---|---|---|---|---|")
    for chain, label in ((True, "ancestors in consecutive slots (chain-like)"), (False, "other nodes")):
        s = stats[chain]
        print(f"| {label} | {s['count']} | {s['features_equal']} | {s['logits_equal']} | "
              f"{s['max_diff_features']:.3g} | {s['max_diff_logits']:.3g} |")
    return {"chain-like": stats[True], "other": stats[False]}


if __name__ == "__main__":
    main()
    sys.exit(0)
