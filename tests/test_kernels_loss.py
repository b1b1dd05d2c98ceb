"""The fused lm_head + soft cross-entropy (chunked, recomputing logits in backward) computes what the plain
autograd path computes: loss, accuracy, expected acceptance and gradients, for any chunk size."""

import pytest
import torch

from specforge.eagle3.ttt import SoftLabels, ttt_loss
from specforge.kernels.fused_loss import HeadGrad, default_chunk, fused_soft_ce, soft_ce_reference

from .conftest import tiny_draft, tiny_target


def make_case(n=23, h=16, vd=40, v_full=97, b=3, t=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    w = torch.randn(vd, h, generator=g, dtype=dtype) * 0.7
    full = torch.randn(b, t, v_full, generator=g, dtype=dtype) * 3
    d2t = torch.randint(0, v_full - vd, (vd,), generator=g)
    draft_ids = torch.arange(vd) + d2t
    labels = SoftLabels(full[..., draft_ids].contiguous(), torch.logsumexp(full, -1), full.argmax(-1))
    b_idx = torch.randint(0, b, (n,), generator=g)
    t_idx = torch.randint(0, t, (n,), generator=g)
    # Make some target argmaxes the draft's own: a few rows are counted correct.
    hit = torch.arange(n) % 4 == 0
    arg = (hidden @ w.t()).argmax(-1)
    labels.argmax[b_idx[hit], t_idx[hit]] = (arg + d2t[arg])[hit]
    return hidden, w, labels, b_idx, t_idx, d2t


def run(fn, hidden, w, *args, **kw):
    hidden = hidden.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss, correct, accept, count = fn(hidden, w, *args, **kw)
    (loss * 1.7).backward()
    return loss.detach(), correct, accept, count, hidden.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 23, 64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
def test_fused_equals_reference_float64(chunk, weighted, recompute):
    hidden, w, labels, b_idx, t_idx, d2t = make_case()
    weight = None
    if weighted:  # some zero weights (out-of-vocab rows), as bool like ttt_loss passes them
        weight = torch.arange(hidden.shape[0]) % 3 != 1
    ref = run(soft_ce_reference, hidden, w, labels, b_idx, t_idx, weight, d2t)
    got = run(fused_soft_ce, hidden, w, labels, b_idx, t_idx, weight, d2t, chunk=chunk, recompute=recompute)
    assert int(ref[1]) > 0 and int(got[1]) == int(ref[1])
    assert int(got[3]) == int(ref[3]) == hidden.shape[0]
    for a, b in zip(got[:1] + got[2:3] + got[4:], ref[:1] + ref[2:3] + ref[4:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_float32_and_no_grad_and_empty():
    hidden, w, labels, b_idx, t_idx, d2t = make_case(n=50, vd=64, dtype=torch.float32, seed=3)
    ref = run(soft_ce_reference, hidden, w, labels, b_idx, t_idx, None, d2t)
    got = run(fused_soft_ce, hidden, w, labels, b_idx, t_idx, None, d2t, chunk=16)
    assert int(got[1]) == int(ref[1])
    for a, b in zip(got[:1] + got[2:3] + got[4:], ref[:1] + ref[2:3] + ref[4:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    w_leaf = w.clone().requires_grad_(True)
    with torch.no_grad():  # evaluation: statistics only, no gradient work
        loss, correct, accept, count = fused_soft_ce(hidden, w_leaf, labels, b_idx, t_idx, None, d2t, chunk=9)
    torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-6)
    assert int(correct) == int(ref[1]) and loss.grad_fn is None
    # No scored rows: zero loss and statistics, zero gradients.
    for recompute in (True, False):
        empty = run(fused_soft_ce, hidden[:0], w, labels, b_idx[:0], t_idx[:0], None, d2t, recompute=recompute)
        assert float(empty[0]) == 0 and int(empty[1]) == 0 and float(empty[2]) == 0 and int(empty[3]) == 0
        assert empty[4].shape == (0, 16) and float(empty[5].abs().sum()) == 0
    # Only the weight needs a gradient (a frozen hidden state): the hidden gets none.
    w1 = w.clone().requires_grad_(True)
    for recompute in (True, False):
        loss = fused_soft_ce(hidden, w1, labels, b_idx, t_idx, None, d2t, chunk=16, recompute=recompute)[0]
        (g,) = torch.autograd.grad(loss * 1.7, w1)
        torch.testing.assert_close(g, ref[5], rtol=1e-5, atol=1e-6)


def _shared_calls(hidden, w, labels, b_idx, t_idx, d2t, coefs, sizes, head_grad=True, chunk=7):
    """Calls of fused_soft_ce on consecutive slices of `hidden` (one per TTT step), loss = 1.7 * sum coef_k
    loss_k backpropagated; with `head_grad` the calls share one HeadGrad, as ttt_loss makes them. Returns the
    loss, the hidden's and the weight's gradients and the shapes of the tensors the graph saved."""
    hidden = hidden.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    sink = HeadGrad(w) if head_grad else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(tuple(x.shape)) or x, lambda x: x):
        total, start = 0.0, 0
        for coef, n in zip(coefs, sizes):
            sl = slice(start, start + n)
            loss = fused_soft_ce(hidden[sl], w, labels, b_idx[sl], t_idx[sl], None, d2t, chunk=chunk,
                                 head_grad=sink, coef=coef if head_grad else 1.0)[0]
            total, start = total + coef * loss, start + n
        if sink is not None:
            total = sink.tie(total)
    (total * 1.7).backward()
    return total.detach(), hidden.grad, w.grad, saved


def test_shared_head_gradient_equals_the_reference_float64():
    """Steps sharing one HeadGrad (each adds coef_k times its lm_head gradient; the tie hands the sum, times
    the outer 1.7, to the weight) give the plain autograd gradients, and the graph keeps no [Vd, H] buffer
    per step."""
    hidden, w, labels, b_idx, t_idx, d2t = make_case(n=50, seed=5)
    coefs, sizes = [1.0, 0.8, 0.64, 0.512], [12, 0, 17, 21]  # an empty step too
    ref_hidden = hidden.clone().requires_grad_(True)
    ref_w = w.clone().requires_grad_(True)
    total, start = 0.0, 0
    for coef, n in zip(coefs, sizes):
        sl = slice(start, start + n)
        loss = soft_ce_reference(ref_hidden[sl], ref_w, labels, b_idx[sl], t_idx[sl], None, d2t)[0]
        total, start = total + coef * loss, start + n
    (total * 1.7).backward()
    got = _shared_calls(hidden, w, labels, b_idx, t_idx, d2t, coefs, sizes)
    own = _shared_calls(hidden, w, labels, b_idx, t_idx, d2t, coefs, sizes, head_grad=False)
    for res in (got, own):
        torch.testing.assert_close(res[0], total.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(res[1], ref_hidden.grad, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(res[2], ref_w.grad, rtol=1e-10, atol=1e-13)
    assert got[0].item() == own[0].item()  # the tie adds an exact zero to the loss
    assert own[3].count(tuple(w.shape)) == 4  # each step kept its own lm_head gradient (zeros when empty)
    assert tuple(w.shape) not in got[3]  # shared: none kept per step


def test_shared_head_gradient_no_rows_and_errors():
    hidden, w, labels, b_idx, t_idx, d2t = make_case(n=20, seed=6)
    got = _shared_calls(hidden, w, labels, b_idx, t_idx, d2t, [1.0, 0.8], [0, 0])  # nothing scored
    assert float(got[0]) == 0 and float(got[2].abs().sum()) == 0 and got[2].shape == w.shape
    w1 = w.clone().requires_grad_(True)
    args = (hidden, w1, labels, b_idx, t_idx, None, d2t)
    with pytest.raises(ValueError, match="recompute"):
        fused_soft_ce(*args, recompute=True, head_grad=HeadGrad(w1))
    with pytest.raises(ValueError, match="positive"):
        fused_soft_ce(*args, head_grad=HeadGrad(w1), coef=0.0)
    with pytest.raises(ValueError, match="none is given"):
        fused_soft_ce(*args, coef=0.5)
    with pytest.raises(ValueError, match="another weight"):
        fused_soft_ce(*args, head_grad=HeadGrad(w.clone()))
    with torch.no_grad():  # evaluation: the HeadGrad is left alone
        sink = HeadGrad(w1)
        loss = fused_soft_ce(*args, head_grad=sink, coef=0.8)[0]
        assert sink.acc is None and loss.grad_fn is None


def test_default_chunk():
    assert default_chunk(32000) * 32000 * 4 <= 256 << 20 < (default_chunk(32000) + 1) * 32000 * 4
    assert default_chunk(32000, 2) == (256 << 20) // (2 * 32000) == 4194
    assert default_chunk(10 ** 12) == 1


@pytest.mark.parametrize("dtype, tol, recompute", [(torch.float64, 1e-10, False), (torch.float64, 1e-10, True),
                                                   (torch.float32, 2e-5, False)])
@pytest.mark.parametrize("mask_out_of_vocab", [True, False])
def test_ttt_loss_fused_equals_unfused(dtype, tol, recompute, mask_out_of_vocab):
    target = tiny_target(dtype=dtype)
    draft = tiny_draft(target, dtype=dtype)
    torch.manual_seed(2)
    b, t, steps = 2, 16, 4
    ids = torch.randint(0, 256, (b, t))
    aux = torch.randn(b, t, 192, dtype=dtype)
    full = torch.randn(b, t, 256, dtype=dtype) * 3
    draft_ids = torch.arange(64) + draft.d2t
    labels = SoftLabels(full[..., draft_ids].contiguous(), torch.logsumexp(full, -1), full.argmax(-1))
    loss_mask = torch.zeros(b, t, dtype=torch.bool)
    loss_mask[0, 3:] = True
    loss_mask[1, 6:13] = True
    out = {}
    for fused in (False, True):
        draft.zero_grad(set_to_none=True)
        total, stats = ttt_loss(draft, ids, loss_mask, aux, labels, steps, 0.8, mask_out_of_vocab,
                                fused=fused, loss_chunk=5, loss_recompute=recompute)
        total.backward()
        out[fused] = total.detach(), stats, {n: p.grad.clone() for n, p in draft.named_parameters()}
    (t0, s0, g0), (t1, s1, g1) = out[False], out[True]
    torch.testing.assert_close(t1, t0, rtol=tol, atol=tol)
    for a, b in zip(s1, s0):
        torch.testing.assert_close(a.loss, b.loss, rtol=tol, atol=tol)
        torch.testing.assert_close(a.accept, b.accept, rtol=tol, atol=tol)
        assert int(a.correct) == int(b.correct) and int(a.count) == int(b.count)
    assert set(g1) == set(g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=tol, atol=tol, msg=name)


def test_tv_term_is_the_total_variation_from_the_target_float64():
    """tv_weight adds, per row, the total variation between the target's full-vocab distribution p and the
    draft's q (q has no mass outside the draft vocab): written here as half the L1 distance, against the
    implementation's 1 - sum min(p, q); and its gradient is autograd's on that formula (gradcheck)."""
    hidden, w, labels, b_idx, t_idx, d2t = make_case()
    weight = torch.arange(hidden.shape[0]) % 3 != 1
    lam = 0.7
    got = run(soft_ce_reference, hidden, w, labels, b_idx, t_idx, weight, d2t, tv_weight=lam)
    ce_only = run(soft_ce_reference, hidden, w, labels, b_idx, t_idx, weight, d2t)
    q = torch.softmax(hidden @ w.t(), -1)
    p = torch.exp(labels.logits[b_idx, t_idx] - labels.lse[b_idx, t_idx, None])
    tv = 0.5 * ((p - q).abs().sum(-1) + (1 - p.sum(-1)))
    wf = weight.double()
    expected = ce_only[0] + lam * (tv * wf).sum() / wf.sum()
    torch.testing.assert_close(got[0], expected, rtol=1e-12, atol=1e-12)
    assert 0 < float(tv.min()) and float(tv.max()) < 1
    # the statistics do not change with the loss
    assert int(got[1]) == int(ce_only[1]) and torch.equal(got[2], ce_only[2])
    h = hidden[:6].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: soft_ce_reference(x, w, labels, b_idx[:6], t_idx[:6], None, d2t, tv_weight=lam)[0], (h,))


def test_ttt_loss_with_tv_takes_the_unfused_path():
    target = tiny_target(dtype=torch.float64)
    draft = tiny_draft(target, dtype=torch.float64)
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (2, 16))
    aux = torch.randn(2, 16, 192, dtype=torch.float64)
    full = torch.randn(2, 16, 256, dtype=torch.float64) * 3
    draft_ids = torch.arange(64) + draft.d2t
    labels = SoftLabels(full[..., draft_ids].contiguous(), torch.logsumexp(full, -1), full.argmax(-1))
    loss_mask = torch.ones(2, 16, dtype=torch.bool)
    totals = {}
    for fused, tv in ((True, 0.5), (False, 0.5), (False, 0.0)):
        totals[fused, tv], _ = ttt_loss(draft, ids, loss_mask, aux, labels, 3, fused=fused, tv_weight=tv,
                                        attention="reference")
    assert torch.equal(totals[True, 0.5], totals[False, 0.5])
    assert float(totals[False, 0.5]) > float(totals[False, 0.0])  # the term is positive
