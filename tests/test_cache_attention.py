"""Decoding attention under a (prefix, local) slot mask: the dense form's meaning on the CPU, and the Triton
kernel against a float64 reference on a GPU, including one CUDA graph replayed at several cache lengths."""

import math

import pytest
import torch

from specforge.kernels import batch_invariant
from specforge.kernels import cache_attention as ca
from specforge.kernels import counters
from specforge.kernels.cache_attention import cache_attention, cache_attention_reference, dense_mask, launch_grid
from specforge.kernels.invariant_attention import attention_reference
from specforge.layers import SlotMask, cache_mask, grouped_attention

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_dense_mask_is_prefix_then_local_marks():
    g = torch.Generator().manual_seed(0)
    local = torch.rand(4, 6, generator=g) < 0.5
    for prefix in (0, 3, 10):
        got = dense_mask(torch.tensor([prefix]), local, 20)
        for s in range(4):
            for j in range(20):
                want = j < prefix or (prefix <= j < prefix + 6 and bool(local[s, j - prefix]))
                assert bool(got[s, j]) == want, (prefix, s, j)


def test_slot_mask_through_grouped_attention_equals_plain_attention():
    """The path every decoding forward takes on the CPU (the SlotMask made dense over its span) gives what
    plain masked attention over the same slots gives, in float64."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 5, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(2))
    local = torch.ones(5, 5, dtype=torch.bool).tril()
    mask = SlotMask(torch.tensor([17]), local, 32)
    got = grouped_attention(q, k[:, :, :32], v[:, :, :32], cache_mask(mask, 3, 32))
    explicit = torch.zeros(1, 5, 40, dtype=torch.bool)
    explicit[:, :, :17] = True
    explicit[0, :, 17:22] = local
    torch.testing.assert_close(got, attention_reference(q, k, v, explicit), rtol=1e-12, atol=1e-12)
    with batch_invariant.batch_invariant(True):  # the deterministic switch takes it dense as well
        torch.testing.assert_close(grouped_attention(q, k[:, :, :32], v[:, :, :32], cache_mask(mask, 3, 32)), got,
                                   rtol=1e-12, atol=1e-12)


def test_launch_grid_covers_every_row_and_slot_once():
    """Row blocks times rows per program cover the g*s stacked rows with less than one block to spare, rows
    per program are powers of two from 16 up to the row block, and the ranges cover the cache."""
    for g in (1, 3, 4, 5, 6, 8):
        for s in (1, 4, 6, 16, 21):
            for length in (1, 63, 64, 300, 2064):
                for split, row_block in ((256, 128), (64, 16), (128, 32), (32, 64)):
                    rows, nrb, nsplit = launch_grid(g, s, length, split, row_block)
                    assert rows >= 16 and rows & (rows - 1) == 0 and rows <= max(16, row_block)
                    assert nrb * rows >= g * s > (nrb - 1) * rows
                    assert nsplit * split >= length > (nsplit - 1) * split
    assert launch_grid(6, 6, 512, 256, 128) == (64, 1, 2)  # the first launch: one block of all rows
    assert launch_grid(6, 6, 512) == (16, 3, 8)  # the defaults: 16-row blocks over 64-slot ranges


CASES = [  # (query heads, kv heads, queries, local slots, cache slots, prefix, head dim)
    (9, 3, 1, 1, 2064, 0, 64), (9, 3, 1, 1, 2064, 700, 64), (9, 3, 6, 6, 2064, 511, 64),
    (9, 3, 16, 16, 2064, 1999, 64), (9, 3, 4, 20, 2071, 1024, 64), (32, 8, 16, 16, 4112, 3000, 128),
    (40, 8, 16, 16, 300, 17, 128), (16, 2, 8, 8, 520, 256, 64)]


def _case(hq, hk, s, t, length, prefix, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, hq, s, d, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(1, hk, length, d, device="cuda", generator=g).to(dtype) for _ in range(2))
    local = torch.rand(s, t, device="cuda", generator=g) < 0.6
    local[:, 0] = True
    if prefix == 0:
        local[0, 0] = True  # every row reads something
    else:
        local[-1] = False  # a row that reads the prefix only
    return q, k, v, torch.tensor([prefix], device="cuda"), local


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_float64_reference(case, dtype):
    q, k, v, prefix, local = _case(*case, dtype)
    ref = cache_attention_reference(q.double(), k.double(), v.double(), prefix, local)
    got = cache_attention(q, k, v, prefix, local)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), ref, **tol)
    assert torch.equal(cache_attention(q, k, v, prefix, local), got)  # run to run


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("split,row_block", [(256, 128), (128, 32), (64, 64)])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5], (12, 2, 16, 16, 700, 450, 128)])
def test_narrow_ranges_and_row_blocks_equal_float64_reference(case, split, row_block, monkeypatch):
    """Launch shapes other than the defaults (the first launch, 256/128, among them; `scripts/bench_cache_attention.py`
    times them) compute the same attention."""
    monkeypatch.setattr(ca, "SPLIT", split)
    monkeypatch.setattr(ca, "ROW_BLOCK", row_block)
    for dtype, tol in ((torch.float32, dict(rtol=1e-4, atol=1e-5)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))):
        q, k, v, prefix, local = _case(*case, dtype)
        ref = cache_attention_reference(q.double(), k.double(), v.double(), prefix, local)
        torch.testing.assert_close(cache_attention(q, k, v, prefix, local).double(), ref, **tol)


@gpu
@pytest.mark.gpu
def test_one_graph_serves_every_cache_length():
    """Captured once, replayed with the prefix changed in place: each replay reads its own length."""
    q, k, v, prefix, local = _case(9, 3, 6, 6, 2064, 100, 64, torch.bfloat16)
    fn = torch.compile(lambda q_, p: cache_attention(q_, k, v, p, local) * 1.0, dynamic=True)
    for _ in range(2):
        fn(q, prefix)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(q, prefix)
    for n in (5, 100, 1030, 2058):
        prefix.fill_(n)
        graph.replay()
        ref = cache_attention_reference(q.double(), k.double(), v.double(), prefix, local)
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
        assert math.isfinite(float(out.float().abs().max()))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[5], (12, 2, 6, 6, 2064, 900, 128)])
def test_merge_inside_the_launch_equals_merge_kernel(case, monkeypatch):
    """The ranges merged by the last program of each block (head dims up to FUSE_MAX_D) and by the second
    kernel give the same attention (float32: within rounding of the merge order), run after run, and every
    arrival counter is back at zero afterwards (the next call, or a graph replay, starts from it)."""
    q, k, v, prefix, local = _case(*case, torch.float32)
    ref = cache_attention_reference(q.double(), k.double(), v.double(), prefix, local)
    got = {}
    for fuse_max_d in (0, 128):
        monkeypatch.setattr(ca, "FUSE_MAX_D", fuse_max_d)
        got[fuse_max_d] = cache_attention(q, k, v, prefix, local)
        torch.testing.assert_close(got[fuse_max_d].double(), ref, rtol=1e-4, atol=1e-5)
        for _ in range(3):
            assert torch.equal(cache_attention(q, k, v, prefix, local), got[fuse_max_d])
    torch.testing.assert_close(got[0], got[128], rtol=1e-5, atol=1e-6)
    assert int(counters._counters[q.device].abs().sum()) == 0
