"""The TTT attention per unroll step, timed, beside the causal attention of the same shape (a floor).

Why: in the 8B training step on an H200 (docs/benchmarks.md, twenty-seventh session) the draft's FlexAttention
took 2.9 ms forward and 6.7 ms backward over 7 steps, about 0.42 ms a step forward, while the target's causal
cuDNN attention of the same heads and length took 0.083 ms a layer. Step k adds only k diagonal keys per query
to the causal part, so the causal kernel bounds what a better TTT kernel could reach. This prints, per step k,
forward and forward+backward time and the TFLOP/s they imply for each variant:

  flex           specforge's kernel as training runs it (`ttt_attention_flex`, torch.compile'd flex_attention)
  sdpa           specforge's `ttt_attention_sdpa`: aten's causal flash attention merged with the diagonal keys
  flex-autotune  the same call compiled with mode="max-autotune-no-cudagraphs" (flex's block sizes autotuned)
  sdpa-causal    F.scaled_dot_product_attention over the step-0 keys only, is_causal (the floor; not TTT math)
  reference      `ttt_attention_reference` (plain PyTorch; dense [T, T] scores)

Before timing, every TTT variant's output and input gradients are compared with the reference's in float64 on
a small problem, and at the measured shape with the first variant's (max |difference| printed).

  python scripts/bench_ttt_attention.py --shape llama3.1-8b --seq 2048           # on a GPU
  python scripts/bench_ttt_attention.py --shape smollm2-135m --seq 256 --reps 2  # anywhere (CPU: slow, small)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from specforge.kernels.ttt_attention import (ttt_attention_flex, ttt_attention_reference, ttt_attention_sdpa,
                                             ttt_block_mask)
from specforge.model_shapes import SHAPES

VARIANTS = ("flex", "sdpa", "flex-autotune", "sdpa-causal", "reference")
_autotuned = None


def flex_autotuned(q, keys, values):
    """`ttt_attention_flex`'s call with flex_attention compiled under max-autotune (CUDA only)."""
    global _autotuned
    from torch.nn.attention.flex_attention import flex_attention

    if _autotuned is None:
        _autotuned = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")
    t, steps = q.shape[2], len(keys)
    k = torch.cat(list(keys), dim=2) if steps > 1 else keys[0]
    v = torch.cat(list(values), dim=2) if steps > 1 else values[0]
    return _autotuned(q, k, v, block_mask=ttt_block_mask(t, steps - 1, q.device), scale=q.shape[-1] ** -0.5,
                      enable_gqa=True)


def sdpa_causal(q, keys, values):
    return F.scaled_dot_product_attention(q, keys[0], values[0], is_causal=True, enable_gqa=True)


def attention_fn(name: str):
    return {"flex": lambda q, ks, vs: ttt_attention_flex(q, ks, vs), "flex-autotune": flex_autotuned,
            "sdpa": lambda q, ks, vs: ttt_attention_sdpa(q, ks, vs),
            "sdpa-causal": sdpa_causal, "reference": lambda q, ks, vs: ttt_attention_reference(q, ks, vs)}[name]


def inputs(b, hq, hk, t, d, step, dtype, device, seed=0):
    """q and the keys/values of steps 0..step, leaf tensors that want gradients."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def leaf(h):
        return torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    return leaf(hq), [leaf(hk) for _ in range(step + 1)], [leaf(hk) for _ in range(step + 1)]


def outputs_and_grads(fn, q, keys, values, grad_out):
    for x in [q, *keys, *values]:
        x.grad = None
    out = fn(q, keys, values)
    out.backward(grad_out)
    return [out.detach()] + [torch.zeros_like(x) if x.grad is None else x.grad.detach().clone()  # unused: zero
                             for x in [q, *keys, *values]]


def max_difference(a, b) -> float:
    return max((x.cpu().double() - y.cpu().double()).abs().max().item() for x, y in zip(a, b))


def check(name, device, dtype, shape, step) -> str:
    """Max |difference| of output and input gradients: against the float64 reference on a small problem
    (the variant in its own dtype on `device`), as a line."""
    b, hq, hk, t, d = shape
    fn = attention_fn(name)
    q, ks, vs = inputs(b, hq, hk, t, d, step, dtype, device)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    got = outputs_and_grads(fn, q, ks, vs, grad)
    q64, ks64, vs64 = inputs(b, hq, hk, t, d, step, torch.float64, "cpu")
    want = outputs_and_grads(attention_fn("reference"), q64, ks64, vs64, grad.cpu().double())
    return f"{name}: step {step}, [{b}, {hq}/{hk} heads, {t}, {d}] {dtype}: max |diff| {max_difference(got, want):.2e}"


def timed(fn, q, keys, values, grad_out, reps: int, backward: bool) -> float:
    """Median ms of `reps` calls (after one untimed)."""
    cuda = q.device.type == "cuda"
    times = []
    for i in range(reps + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(q, keys, values)
        if backward:
            out.backward(grad_out)
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def attention_flops(b, hq, t, d, step, causal_only: bool) -> float:
    """Forward multiply-adds x 2 of the scores and the weighted sum over the keys each query sees."""
    keys_seen = t * (t + 1) / 2 + (0 if causal_only else step * t)
    return 4.0 * b * hq * d * keys_seen


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=7, help="TTT steps (the unroll's length)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variant", action="append", choices=VARIANTS,
                    help="default: flex, sdpa, flex-autotune and sdpa-causal on CUDA; reference, flex and sdpa on "
                         "the CPU")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    variants = args.variant or (["flex", "sdpa", "flex-autotune", "sdpa-causal"] if device == "cuda"
                                else ["reference", "flex", "sdpa"])
    if device == "cpu" and "flex-autotune" in variants:
        raise SystemExit("--variant flex-autotune: needs CUDA (compiled flex_attention has no CPU backward)")
    s = SHAPES[args.shape]
    hq, hk = s["num_attention_heads"], s["num_key_value_heads"]
    d = s.get("head_dim") or s["hidden_size"] // hq
    b, t = args.batch, args.seq

    for name in variants:
        if name != "sdpa-causal":
            print(check(name, device, dtype, (1, 4, 2, 128, 16), step=2))
    # At the measured shape: each TTT variant against the first one (the reference is too large there on a GPU).
    ttt = [n for n in variants if n != "sdpa-causal"]
    if len(ttt) > 1:
        q, ks, vs = inputs(b, hq, hk, t, d, args.steps - 1, dtype, device)
        grad = torch.randn_like(q)
        base = outputs_and_grads(attention_fn(ttt[0]), q, ks, vs, grad)
        for name in ttt[1:]:
            diff = max_difference(outputs_and_grads(attention_fn(name), q, ks, vs, grad), base)
            print(f"{name} against {ttt[0]}: step {args.steps - 1}, [{b}, {hq}/{hk} heads, {t}, {d}] {dtype}: "
                  f"max |diff| {diff:.2e}")

    name_dev = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n## TTT attention per step, {name_dev}, {dtype}, batch {b}, {hq} heads ({hk} kv), head_dim {d}, "
          f"T={t}; median of {args.reps}")
    print("| variant | step | forward ms | forward TFLOP/s | forward+backward ms | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|")
    totals = {}
    for name in variants:
        fn = attention_fn(name)
        for k in range(args.steps):
            q, ks, vs = inputs(b, hq, hk, t, d, k, dtype, device)
            grad = torch.randn_like(q)
            fwd = timed(fn, q, ks, vs, grad, args.reps, backward=False)
            both = timed(fn, q, ks, vs, grad, args.reps, backward=True)
            flops = attention_flops(b, hq, t, d, k, causal_only=name == "sdpa-causal")
            f0, b0 = totals.get(name, (0.0, 0.0))
            totals[name] = (f0 + fwd, b0 + both)
            tf, tb = flops / fwd / 1e9, 3.5 * flops / both / 1e9
            print(f"| {name} | {k} | {fwd:.3f} | {tf:.1f} | {both:.3f} | {tb:.1f} |")
    print("\nall steps (ms): " + "; ".join(f"{n} forward {f:.2f}, forward+backward {fb:.2f}"
                                          for n, (f, fb) in totals.items()))
    print("(fwd+bwd TFLOP/s counts backward as 2.5 forwards; sdpa-causal counts only the causal part it computes)")


if __name__ == "__main__":
    main()
