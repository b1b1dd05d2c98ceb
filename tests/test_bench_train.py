"""`scripts/bench_train.py`'s phase split of a profiled step: kernels go to the phase whose mark came last."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).parents[1] / "scripts" / "bench_train.py")
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)

M = "at::cuda::(anonymous namespace)::spin_kernel(long)"


def test_phase_split_puts_each_kernel_in_the_phase_after_the_last_mark():
    step = [  # (name, start, duration): one step, its five marks, kernels of each phase, then a second step
        ("Memcpy HtoD (Pageable -> Device)", 0.5, 2.0),
        (M, 1, 0.1), ("nvjet_sm90_tst_256x128_TNT", 2, 30.0), ("vectorized_elementwise_kernel<add>", 3, 4.0),
        (M, 4, 0.1), ("nvjet_sm90_tst_256x128_NNT", 5, 10.0), ("triton_tem_fused_flex_attention_0", 6, 3.0),
        ("soft_ce_fwd", 7, 1.5),
        (M, 8, 0.1), ("direct_copy_kernel_cuda", 9, 2.5), ("triton_tem_fused_flex_attention_backward_1", 10, 6.0),
        (M, 11, 0.1), ("multi_tensor_apply_kernel<adam>", 12, 5.0),
        (M, 13, 0.1), ("vectorized_elementwise_kernel<fill>", 14, 0.25),
    ]
    second = [(n, t + 20, d * 3) for n, t, d in step[1:]]  # every duration tripled
    split = bench_train.phase_split(list(reversed(step + second)))  # the profiler's order need not be time's
    assert dict(split["before"]) == {"copy": [2.0, 1]}
    assert dict(split["target"]) == {"matmul": [120.0, 2], "element-wise / reduction": [16.0, 2]}
    assert dict(split["draft fwd+loss"]) == {"matmul": [40.0, 2], "flex attention": [12.0, 2],
                                             "fused loss": [6.0, 2]}
    assert dict(split["backward"]) == {"copy": [10.0, 2], "flex attention": [24.0, 2]}
    assert dict(split["optimizer"]) == {"optimizer": [20.0, 2]}
    assert dict(split["between steps"]) == {"element-wise / reduction": [1.0, 2]}
    # the marks are not counted: everything else is, once
    total = sum(v[0] for by in split.values() for v in by.values())
    assert total == pytest.approx(sum(d for n, _, d in step + second if n != M))
    by_name = bench_train.phase_split(step + second, key=str)  # --profile-top's listing: by kernel
    assert dict(by_name["backward"]) == {"direct_copy_kernel_cuda": [10.0, 2],
                                         "triton_tem_fused_flex_attention_backward_1": [24.0, 2]}


def test_phase_table_gives_milliseconds_per_step():
    split = bench_train.phase_split([(M, 0, 0.1), ("nvjet_x", 1, 3000.0), ("add_kernel", 2, 1000.0),
                                     (M, 3, 0.1), ("add_kernel", 4, 500.0)])
    lines = bench_train.phase_table(split, steps=2).splitlines()
    assert lines[0] == "| phase | matmul | element-wise / reduction | all |"
    assert lines[2] == "| target | 1.50 | 0.50 | 2.00 |"
    assert lines[3] == "| draft fwd+loss |  | 0.25 | 0.25 |"


def test_idle_gaps_sum_the_waits_by_phase_of_the_kernel_that_ends_them():
    kernels = [  # (name, start, duration) in microseconds, one step with its five marks
        (M, 0, 1), ("nvjet_a", 1, 100), ("add_kernel", 101, 9),  # target: no gap
        (M, 150, 1), ("soft_ce_fwd", 151, 10),  # 40 us before the mark opening the draft's phase
        (M, 161, 1), ("nvjet_b", 170, 20), ("nvjet_c", 175, 5),  # 8 us; nvjet_c overlaps nvjet_b: no gap
        ("copy_kernel", 290, 10),  # 100 us after the end of nvjet_b (190), not nvjet_c's (180)
        (M, 300, 1), ("multi_tensor_apply_kernel<adam>", 301, 50), (M, 351, 1),
    ]
    idle, longest = bench_train.idle_gaps(list(reversed(kernels)), top=2)
    assert dict(idle) == {"draft fwd+loss": 40, "backward": 108}
    assert longest == [(100, "backward", "nvjet_c", "copy_kernel"), (40, "draft fwd+loss", "add_kernel", M)]


def test_idle_gaps_can_leave_out_the_first_step():
    """A profile starts from an idle GPU: its first step's waits are the host's start-up, not the steady state."""
    step = [(M, 0, 1), ("nvjet_a", 50, 10), (M, 60, 1), ("soft_ce", 61, 5), (M, 66, 1), ("nvjet_b", 67, 5),
            (M, 72, 1), ("adam", 73, 5), (M, 78, 1)]
    second = [(n, t + 100, d) for n, t, d in step]  # 22 us after the first step's end, then 49 us in the target
    idle, _ = bench_train.idle_gaps(step + second)
    assert dict(idle) == {"target": 49 + 21 + 49}  # the second step's first mark opens its target phase
    idle, longest = bench_train.idle_gaps(step + second, skip_steps=1)
    assert dict(idle) == {"target": 21 + 49} and longest[0] == (49, "target", M, "nvjet_a")
