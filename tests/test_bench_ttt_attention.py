"""`scripts/bench_ttt_attention.py`: its correctness check and its FLOP count, on the CPU."""

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "bench_ttt_attention", Path(__file__).parents[1] / "scripts" / "bench_ttt_attention.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_flops_count_the_keys_the_ttt_mask_lets_each_query_see():
    t, step, b, hq, d = 12, 3, 2, 4, 8
    q_idx = torch.arange(t)[:, None]
    kv_idx = torch.arange(t * (step + 1))[None, :]
    seen = ((kv_idx <= q_idx) | (kv_idx % t == q_idx)).sum().item()  # the flex mask of ttt_attention, dense
    assert bench.attention_flops(b, hq, t, d, step, causal_only=False) == 4.0 * b * hq * d * seen
    assert bench.attention_flops(b, hq, t, d, step, causal_only=True) == 4.0 * b * hq * d * t * (t + 1) / 2


def test_check_compares_flex_with_the_float64_reference():
    line = bench.check("flex", "cpu", torch.float32, (1, 4, 2, 64, 8), step=2)
    assert float(line.rsplit(" ", 1)[1]) < 1e-5, line
    # a wrong kernel is caught: the causal-only floor is not TTT attention past step 0
    q, ks, vs = bench.inputs(1, 4, 2, 64, 8, 2, torch.float64, "cpu")
    grad = torch.randn_like(q)
    ref = bench.outputs_and_grads(bench.attention_fn("reference"), q, ks, vs, grad)
    floor = bench.outputs_and_grads(bench.attention_fn("sdpa-causal"), q, ks, vs, grad)
    assert bench.max_difference(ref[:2], floor[:2]) > 1e-2
