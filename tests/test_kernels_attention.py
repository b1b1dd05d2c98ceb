"""TTT attention: the FlexAttention form (flex's eager path on CPU) and the causal flash attention merged with
the diagonal ('sdpa', aten's CPU flash kernel here) equal the plain PyTorch reference, forward and gradients,
and the draft unrolled with any of them gives the same hidden states."""

import shutil
import warnings

import pytest
import torch

from specforge.eagle3.ttt import TTTAttention, ttt_unroll
from specforge.kernels.ttt_attention import (ttt_attention, ttt_attention_flex, ttt_attention_reference,
                                             ttt_attention_sdpa, ttt_block_mask)

from .conftest import unroll_inputs


def _inputs(b, hq, hkv, t, d, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=gen, dtype=dtype).requires_grad_()
    keys = [torch.randn(b, hkv, t, d, generator=gen, dtype=dtype).requires_grad_() for _ in range(k + 1)]
    values = [torch.randn(b, hkv, t, d, generator=gen, dtype=dtype).requires_grad_() for _ in range(k + 1)]
    return q, keys, values


def _dense_ttt(q, keys, values):
    """Independent check of the pattern: plain masked softmax over [K0; ...; Kk] with an explicit mask."""
    b, hq, t, d = q.shape
    g = hq // keys[0].shape[1]
    k = torch.cat(keys, 2).repeat_interleave(g, 1)
    v = torch.cat(values, 2).repeat_interleave(g, 1)
    diag = [torch.eye(t, dtype=torch.bool)] * (len(keys) - 1)
    mask = torch.cat([torch.ones(t, t, dtype=torch.bool).tril()] + diag, 1)
    s = (q @ k.transpose(-1, -2)) * d ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v


CASES = [  # (B, Hq, Hkv, T, D, k)
    (1, 2, 2, 37, 8, 0),
    (2, 4, 2, 37, 16, 1),
    (1, 4, 1, 130, 8, 2),
    (2, 6, 3, 21, 8, 3),
    (1, 2, 1, 128, 8, 3),
]


@pytest.mark.parametrize("impl", [ttt_attention_flex, ttt_attention_sdpa], ids=["flex", "sdpa"])
@pytest.mark.parametrize("b,hq,hkv,t,d,k", CASES)
def test_impl_equals_reference_forward_and_grads(b, hq, hkv, t, d, k, impl):
    q, keys, values = _inputs(b, hq, hkv, t, d, k, torch.float64)
    want = ttt_attention_reference(q, keys, values)
    got = impl(q, keys, values)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(want, _dense_ttt(q, keys, values), rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(want)
    leaves = [q, *keys, *values]
    g_want = torch.autograd.grad(want, leaves, grad)
    g_got = torch.autograd.grad(got, leaves, grad)
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_float32_without_grad():
    """Inputs that need no grad take the public flex_attention (eager on CPU)."""
    q, keys, values = _inputs(1, 4, 2, 50, 16, 2, torch.float32, seed=3)
    q, keys, values = q.detach(), [x.detach() for x in keys], [x.detach() for x in values]
    torch.testing.assert_close(ttt_attention_flex(q, keys, values), ttt_attention_reference(q, keys, values),
                               rtol=1e-5, atol=1e-6)


def test_sdpa_in_bfloat16_is_as_close_as_the_reference():
    """16-bit inputs: flash keeps its statistics in float32 and the merge runs in float32, so the output and
    the gradients are about as close to the float64 result as the bf16 reference's (which rounds its
    probabilities to bf16)."""
    q, keys, values = _inputs(2, 4, 2, 70, 16, 3, torch.float64, seed=5)
    leaves64 = [q, *keys, *values]
    gold = ttt_attention_reference(q, keys, values)
    grad = torch.randn_like(gold)
    g_gold = torch.autograd.grad(gold, leaves64, grad)
    leaves = [x.detach().bfloat16().requires_grad_() for x in leaves64]
    errs = []
    for fn in (ttt_attention_sdpa, ttt_attention_reference):
        out = fn(leaves[0], leaves[1:5], leaves[5:])
        assert out.dtype == torch.bfloat16
        got = [out, *torch.autograd.grad(out, leaves, grad.bfloat16())]
        errs.append([((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, [gold, *g_gold])])
    for sdpa_err, ref_err in zip(*errs):
        assert sdpa_err < max(2 * ref_err, 1e-2), errs


def test_sdpa_with_kv_heads_repeated_equals_reference(monkeypatch):
    """Where the flash kernel lacks grouped-query heads, k0/v0 go in repeated and their gradients come back
    summed over each group: the same numbers as the kernel's own GQA."""
    from specforge.kernels import ttt_attention as mod

    monkeypatch.setitem(mod._flash_gqa, "cpu", False)
    q, keys, values = _inputs(2, 6, 2, 33, 8, 2, torch.float64)
    want = ttt_attention_reference(q, keys, values)
    got = ttt_attention_sdpa(q, keys, values)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(want)
    leaves = [q, *keys, *values]
    for a, e in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_sdpa_refuses_packed_rows():
    q, keys, values = _inputs(1, 2, 2, 9, 8, 1, torch.float64)
    with pytest.raises(ValueError, match="packed rows"):
        ttt_attention(q, keys, values, impl="sdpa", doc_ids=torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("state", [(False, False), (True, True), (True, False)])
def test_deterministic_algorithms_around_flash_backward_restores_the_caller(state):
    """The sdpa form's flash backward runs with deterministic algorithms on (fixed-order dQ sums on CUDA), and
    the caller's setting, warn-only included, is what it was afterwards, also when the call raises."""
    from specforge.kernels.ttt_attention import _deterministic_algorithms

    def now():
        return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()

    was = now()
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    try:
        with _deterministic_algorithms():
            assert now() == (True, False)
        assert now() == state
        with pytest.raises(RuntimeError, match="inside"):
            with _deterministic_algorithms():
                raise RuntimeError("inside")
        assert now() == state
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_block_mask_pattern_and_cache():
    t, k = 37, 2
    bm = ttt_block_mask(t, k, "cpu")
    assert ttt_block_mask(t, k, "cpu") is bm
    n = torch.arange(t * (k + 1))
    q = torch.arange(t)[:, None]
    want = (n < t) & (n <= q) | (n >= t) & (n % t == q)
    dense = bm.to_dense()  # [1, 1, q blocks, kv blocks]
    blocks = torch.nn.functional.pad(want, (0, -want.shape[1] % 128, 0, -t % 128))
    blocks = blocks.view(dense.shape[-2], 128, dense.shape[-1], 128).any(-1).any(1)
    assert torch.equal(dense[0, 0].bool(), blocks)


def test_dispatch_and_bad_impl():
    q, keys, values = _inputs(1, 2, 2, 9, 8, 1, torch.float64)
    out = ttt_attention(q, keys, values)  # CPU: auto = reference
    torch.testing.assert_close(out, ttt_attention_reference(q, keys, values), rtol=0, atol=0)
    with pytest.raises(ValueError):
        ttt_attention(q, keys, values, impl="nope")
    with pytest.raises(ValueError):
        TTTAttention("nope")


@pytest.mark.parametrize("impl", ["flex", "sdpa"])
def test_ttt_unroll_impl_equals_reference(impl):
    b, t, steps = 2, 19, 4
    draft, ids, aux = unroll_inputs(b, t)
    ref = [h for _, h in ttt_unroll(draft, ids, aux, steps, attention="reference")]
    flex = [h for _, h in ttt_unroll(draft, ids, aux, steps, attention=impl)]
    for a, e in zip(flex, ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    # Gradients of the draft's weights through all steps agree too.
    loss_ref = sum((h ** 2).mean() for h in ref)
    loss_flex = sum((h ** 2).mean() for h in flex)
    params = [p for n, p in draft.named_parameters() if not n.startswith(("norm.", "lm_head."))]  # used by logits only
    for a, e in zip(torch.autograd.grad(loss_flex, params), torch.autograd.grad(loss_ref, params)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(shutil.which("g++") is None, reason="compiling flex on the CPU needs a C++ compiler")
def test_compiled_flex_survives_the_shapes_of_real_data():
    """Batches of one and of several rows, rows of one and of several 128-token blocks, every TTT step:
    more graphs than dynamo's default limit of 8. The compiled flex must keep compiling (not fall back to
    the unfused path for good, which a 4-GPU run did) and keep equal to the reference. Forward only: the
    CPU kernel has no backward."""
    from specforge.kernels.ttt_attention import _compiled_flex_attention

    flex = _compiled_flex_attention()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b, t in [(2, 256), (2, 384), (1, 512), (2, 128), (1, 384), (1, 128), (3, 256), (2, 640)]:
            for k in range(3):
                q = torch.randn(b, 4, t, 16, generator=g)
                keys = [torch.randn(b, 2, t, 16, generator=g) for _ in range(k + 1)]
                vals = [torch.randn(b, 2, t, 16, generator=g) for _ in range(k + 1)]
                got = flex(q, torch.cat(keys, 2), torch.cat(vals, 2), block_mask=ttt_block_mask(t, k, q.device),
                           scale=0.25, enable_gqa=True)
                want = ttt_attention_reference(q, keys, vals)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not [w for w in caught if "without torch.compile" in str(w.message)]
