"""The cache-attention kernel alone on a GPU, for each target shape and each call the decoder makes, under
several launch shapes: slot range per program (`cache_attention.SPLIT`) and stacked rows per program
(`cache_attention.ROW_BLOCK`). Each call is timed as the decoder runs it, replayed from a CUDA graph (many
calls per graph, so launch costs do not count), and checked against the float64 reference.

  python scripts/bench_cache_attention.py                       # every shape, every setting
  python scripts/bench_cache_attention.py --shape qwen2.5-coder-1.5b --json ca.json

Prints, per (shape, call, filled prefix, cache length), microseconds per call for each setting and the best;
then per shape the total over the calls of a decode step, a chain verify and a tree verify (one call per
layer in each), for the default and the best setting."""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from specforge.kernels import cache_attention as ca
from specforge.model_shapes import SHAPES

CALLS = {"decode": (1, 1), "chain verify": (6, 6), "tree verify": (16, 16)}  # name: (queries S, local slots T)
SETTINGS = [(split, rb) for split in (256, 128, 64) for rb in (128, 64, 32, 16)]


def heads(shape: str) -> tuple[int, int, int, int]:
    """(query heads, kv heads, head dim, layers) of a model_shapes shape."""
    c = SHAPES[shape]
    hq = c["num_attention_heads"]
    return hq, c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // hq, c["num_hidden_layers"]


def inputs(hq, hk, d, s, t, length, prefix, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, hq, s, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, hk, length, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    local = torch.ones(s, t, dtype=torch.bool, device="cuda").tril(t - s)  # causal over this round's slots
    return q, k, v, torch.tensor([prefix], device="cuda"), local


def time_us(fn, calls=50, replays=20) -> float:
    """Median microseconds per call, `calls` calls captured in one graph: fn(i) for i in range(calls) (a
    caller can hand each call its own inputs, say a copy of a weight that the L2 cache does not hold)."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="model shape(s); default: all of smollm2-135m, "
                    "qwen2.5-coder-1.5b, llama3.1-8b")
    ap.add_argument("--prefix", type=int, nargs="+", default=[256, 1024], help="filled slots before the round")
    ap.add_argument("--max-len", type=int, default=2048, help="the whole cache (bench.max_len)")
    ap.add_argument("--json", help="write every timing here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    default = (ca.SPLIT, ca.ROW_BLOCK)
    rows, totals = [], {}
    print("| shape | call | prefix | cache slots | " + " | ".join(f"{s}/{r}" for s, r in SETTINGS) + " | best |")
    print("|---" * (5 + len(SETTINGS)) + "|")
    for shape in args.shape or ["smollm2-135m", "qwen2.5-coder-1.5b", "llama3.1-8b"]:
        hq, hk, d, layers = heads(shape)
        for (call, (s, t)), prefix in itertools.product(CALLS.items(), args.prefix):
            for length in sorted({-(-(prefix + t) // 128) * 128, args.max_len}):
                q, k, v, pre, local = inputs(hq, hk, d, s, t, length, prefix)
                ref = ca.cache_attention_reference(q.double(), k.double(), v.double(), pre, local)
                us = {}
                for split, rb in SETTINGS:
                    ca.SPLIT, ca.ROW_BLOCK = split, rb
                    err = (ca.cache_attention(q, k, v, pre, local).double() - ref).abs().max().item()
                    if not err < 5e-2:
                        raise SystemExit(f"{shape} {call} SPLIT={split} ROW_BLOCK={rb}: error {err:.3g}")
                    us[(split, rb)] = time_us(lambda _: ca.cache_attention(q, k, v, pre, local))
                ca.SPLIT, ca.ROW_BLOCK = default
                best = min(us, key=us.get)
                print(f"| {shape} | {call} | {prefix} | {length} | "
                      + " | ".join(f"{us[x]:.1f}" for x in SETTINGS) + f" | {best[0]}/{best[1]} |", flush=True)
                rows.append({"shape": shape, "call": call, "prefix": prefix, "length": length,
                             "us": {f"{a}/{b}": x for (a, b), x in us.items()}})
                for x in SETTINGS:
                    totals.setdefault((shape, prefix, length == args.max_len), {}).setdefault(x, 0.0)
                    totals[(shape, prefix, length == args.max_len)][x] += us[x] * layers
    print("\nPer shape, prefix and cache kind: ms over one decode step + chain verify + tree verify (a call per "
          "layer each)\n")
    print("| shape | prefix | cache | default (%d/%d) | best setting | best |" % default)
    print("|---|---|---|---|---|---|")
    for (shape, prefix, whole), per in totals.items():
        best = min(per, key=per.get)
        print(f"| {shape} | {prefix} | {'whole' if whole else 'span'} | {per[default] / 1e3:.3f} | "
              f"{best[0]}/{best[1]} | {per[best] / 1e3:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
