"""The batch-invariant kernels against PyTorch's own on a GPU: time and TFLOP/s per shape.

Matmul shapes are a Llama-3.1-8B layer's (and its lm_head), at decode sizes (1, 6, 16 rows) and at training
sizes (2048 rows, forward and both backward products), with and without the K split; then RMSNorm,
log-softmax over the 128k vocab and the cache attention of a decode step.

  python scripts/bench_invariant.py [--tiles 128,128,64,8,3 ...]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from specforge.kernels.invariant_attention import attention
from specforge.kernels.invariant_matmul import TILES, TRAIN_TILES, _triton_matmul
from specforge.kernels.invariant_norm import rms_norm
from specforge.kernels.invariant_softmax import softmax

from bench_decode import time_ms


def ms(fn) -> float:
    return time_ms(fn, iters=20, warmup=3)


LAYER = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096),
         "lm_head": (4096, 128256)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", action="append", default=[], help="BM,BN,BK,warps,stages to try beside the default")
    args = ap.parse_args()
    configs = [("decode tiles", TILES[torch.bfloat16]), ("train tiles", TRAIN_TILES[torch.bfloat16])]
    configs += [(t, tuple(int(x) for x in t.split(","))) for t in args.tiles]
    dt = torch.bfloat16
    print(f"\n## batch-invariant kernels, {torch.cuda.get_device_name()}, bf16; tiles BM,BN,BK,warps,stages: "
          f"decode {TILES[dt]}, train {TRAIN_TILES[dt]}; eager launches (Python launch cost included)")
    head = "| product | M x K x N | cuBLAS ms | " + " | ".join(f"{c} split ms | {c} no-split ms" for c, _ in configs)
    print(head + " | best invariant / cuBLAS |")
    print("|---" * (3 + 2 * len(configs)) + "|---|")
    cases = []
    for name, (k, n) in LAYER.items():
        for m in (1, 6, 16):
            cases.append((f"{name} decode", m, k, n, False))
        cases.append((f"{name} fwd", 2048, k, n, False))
        if name != "lm_head":
            cases.append((f"{name} grad input", 2048, n, k, False))
            cases.append((f"{name} grad weight", n, 2048, k, True))
    for label, m, k, n, transposed in cases:
        a = torch.randn(k, m, device="cuda", dtype=dt).t() if transposed else torch.randn(m, k, device="cuda", dtype=dt)
        w = torch.randn(n, k, device="cuda", dtype=dt)
        b = w.t()
        base = ms(lambda: torch.mm(a, b))
        cells, best = [], float("inf")
        for _, tiles in configs:
            for split in (True, False):
                t = ms(lambda: _triton_matmul(a, b, None, split, tiles))
                best = min(best, t)
                cells.append(f"{t:.3f}")
        print(f"| {label} | {m} x {k} x {n} | {base:.3f} | " + " | ".join(cells) + f" | {best / base:.2f} |",
              flush=True)

    print("\n| op | shape | PyTorch ms | invariant ms | ratio |")
    print("|---|---|---|---|---|")
    x = torch.randn(2048, 4096, device="cuda", dtype=dt)
    w = torch.rand(4096, device="cuda", dtype=dt)
    for rows in (1, 2048):
        ref = ms(lambda: F.rms_norm(x[:rows], (4096,), w, 1e-5))
        inv = ms(lambda: rms_norm(x[:rows], w, 1e-5))
        print(f"| RMSNorm | {rows} x 4096 | {ref:.3f} | {inv:.3f} | {inv / ref:.2f} |")
    z = torch.randn(64, 128256, device="cuda")
    for rows in (1, 64):
        ref = ms(lambda: torch.log_softmax(z[:rows], -1))
        inv = ms(lambda: softmax(z[:rows], log=True))
        print(f"| log-softmax | {rows} x 128256 | {ref:.3f} | {inv:.3f} | {inv / ref:.2f} |")
    kc = torch.randn(1, 8, 2048, 128, device="cuda", dtype=dt)
    vc = torch.randn_like(kc)
    for s in (1, 6, 16):
        q = torch.randn(1, 32, s, 128, device="cuda", dtype=dt)
        mask = torch.arange(2048, device="cuda")[None, None, :] < 1000 + torch.arange(s, device="cuda")[None, :, None]
        rows = mask[:, None, None].expand(1, 1, 4, s, 2048).reshape(1, 1, 4 * s, 2048)
        ref = ms(lambda: F.scaled_dot_product_attention(q.reshape(1, 8, 4 * s, 128), kc, vc, attn_mask=rows))
        inv = ms(lambda: attention(q, kc, vc, mask))
        print(f"| cache attention (32/8 heads, 2048 slots, ~1000 attended) | {s} queries | {ref:.3f} | {inv:.3f} | "
              f"{inv / ref:.2f} |")


if __name__ == "__main__":
    main()
