"""The skinny linear kernel against cuBLAS (F.linear) on a GPU, for each linear layer of a target's decoder
layer and the row counts the decoder hands it: 1 (decode step), 6 (chain verify, S=5), 16 (tree verify).

Each call is replayed from a CUDA graph of many calls, each on its own copy of the weight (together more than
the L2 cache holds, so every call reads its weight from memory, as a decode step does), and checked against
float64. Prints per layer and row count: microseconds and TB/s for cuBLAS and for the kernel's own launch
choice (`skinny_linear.launch`), which of them `linear` runs, and with `--sweep` the best of several launch
settings; then per shape the sum over the four linears of all layers.

  python scripts/bench_linear.py --sweep                         # smollm2-135m and qwen2.5-coder-1.5b
  python scripts/bench_linear.py --shape llama3.1-8b --json lin.json
  python scripts/bench_linear.py --split-programs 264               # K split until about 2 programs per SM
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from specforge.kernels import skinny_linear as sl
from specforge.model_shapes import SHAPES

from bench_cache_attention import time_us

ROWS = (1, 6, 16)
LOOP = [(bn, bk, 4, st, False) for bn in (4, 8, 16, 32) for bk in (256, 512) for st in (2, 4)]
DOT = [(bn, bk, 4, 4, True) for bn in (16, 32, 64) for bk in (128, 256)]
SPLIT = [(bn, bk, 4, 4, True, s) for bn in (16, 32) for bk in (64, 128, 256) for s in (2, 4, 8)]  # K slices


def linears(shape: str) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, bias) of a decoder layer's linears, fused as the static target runs them."""
    c = SHAPES[shape]
    h, hq, hk = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // hq
    inter = c.get("intermediate_size_mlp") or c["intermediate_size"]
    qkv_bias = c.get("model_type") == "qwen2"
    return [("qkv", (hq + 2 * hk) * d, h, qkv_bias), ("o", h, hq * d, False), ("gate_up", 2 * inter, h, False),
            ("down", h, inter, False)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="model_shapes shape(s); default smollm2-135m and "
                    "qwen2.5-coder-1.5b")
    ap.add_argument("--sweep", action="store_true", help="also time every launch setting of LOOP, DOT and SPLIT")
    ap.add_argument("--split-programs", type=int, default=sl.SPLIT_PROGRAMS,
                    help="skinny_linear.SPLIT_PROGRAMS for the kernel's own launch (0: no split of K)")
    ap.add_argument("--rows", choices=sl.ROW_MODES, default=sl.ROWS,
                    help="skinny_linear.ROWS: how the kernel's own launch reduces the rows")
    ap.add_argument("--json", help="write every timing here")
    args = ap.parse_args(argv)
    sl.ROWS, sl.SPLIT_PROGRAMS = args.rows, args.split_programs
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dev = torch.device("cuda")
    rows, totals = [], {}
    print("| shape | linear | N x K | rows | cuBLAS us (TB/s) | kernel us (TB/s) setting | linear() runs | "
          "best of the sweep |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shape or ["smollm2-135m", "qwen2.5-coder-1.5b"]:
        layers = SHAPES[shape]["num_hidden_layers"]
        for name, n, k, has_bias in linears(shape):
            nbytes = n * k * 2
            copies = max(8, min(512, -(-(256 << 20) // nbytes)))
            g = torch.Generator(device=dev).manual_seed(0)
            ws = torch.randn(copies, n, k, device=dev, dtype=torch.bfloat16, generator=g) / k ** 0.5
            bias = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g) if has_bias else None
            for m in ROWS:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
                ref = F.linear(x.double(), ws[0].double(), None if bias is None else bias.double())

                def run(cfg):
                    return lambda i: sl.skinny_linear_kernel(x, ws[i], bias, cfg)

                us = {"cublas": time_us(lambda i: F.linear(x, ws[i], bias), copies)}
                for cfg in [None] + (LOOP + DOT + SPLIT if args.sweep else []):
                    err = (sl.skinny_linear_kernel(x, ws[0], bias, cfg).double() - ref).abs().max().item()
                    if not err < 5e-2 * max(1.0, ref.abs().max().item()):
                        raise SystemExit(f"{shape} {name} rows={m} setting {cfg}: error {err:.3g}")
                    us[cfg] = time_us(run(cfg), copies)
                tuned = {c: t for c, t in us.items() if c not in ("cublas", None)}
                best = min(tuned, key=tuned.get) if tuned else None
                own = sl.launch(m, n, k)
                tb = lambda t: nbytes / (t * 1e-6) / 1e12  # noqa: E731
                used = "kernel" if k <= sl.max_k() else "cuBLAS"
                print(f"| {shape} | {name} | {n} x {k} | {m} | {us['cublas']:.2f} ({tb(us['cublas']):.2f}) | "
                      f"{us[None]:.2f} ({tb(us[None]):.2f}) {own} | {used} | "
                      f"{f'{us[best]:.2f} {best}' if best else '-'} |", flush=True)
                rows.append({"shape": shape, "linear": name, "n": n, "k": k, "rows": m, "cublas_us": us["cublas"],
                             "kernel_us": us[None], "launch": own,
                             "sweep": [{"setting": c, "us": t} for c, t in tuned.items()]})
                t = totals.setdefault((shape, m), [0.0, 0.0, 0.0])
                for j, v in enumerate((us["cublas"], us[None] if k <= sl.max_k() else us["cublas"],
                                       min(us[None], us[best] if best else us[None], us["cublas"]))):
                    t[j] += v * layers / 1e3
    print("\nPer shape and row count: ms over the four linears of every layer\n")
    print("| shape | rows | cuBLAS | linear() | best of cuBLAS, kernel and sweep |")
    print("|---|---|---|---|---|")
    for (shape, m), (c, own, best) in totals.items():
        print(f"| {shape} | {m} | {c:.3f} | {own:.3f} | {best:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
