"""The draft's lm_head, soft-label cross-entropy, accuracy and expected acceptance, fused and chunked over
tokens, so that the [tokens, draft_vocab] float32 logits of the TTT steps never exist whole.

`soft_ce_reference` is the plain computation of one TTT step (what `ttt_loss` did before). `fused_soft_ce`
computes the same from the draft's normed hidden state, one chunk of rows at a time, in one of two modes:
- recompute=False (default, fastest): right after a chunk's statistics its logits gradient is formed and
  multiplied out into grad_h[chunk] and a float32 grad_W accumulator; the forward keeps those two
  ([N, H] and [Vd, H]) and backward only scales them by the incoming gradient. Three matmuls, as unfused.
  A float32 [Vd, H] per call is 524 MB at Vd = 32K, H = 4096, and TTT makes seven calls a batch: with a
  `HeadGrad` the calls of one batch add their lm_head gradients (each times its step's weight in the loss)
  into one buffer instead, and one extra node of the loss (`HeadGrad.tie`) hands it to the weight.
- recompute=True (least memory): the forward keeps per row only the draft's and the target's log-sum-exp
  and the sum of the target probabilities; backward recomputes each chunk's logits. Four matmuls.
On CUDA with float32 statistics two Triton kernels do a chunk's row-wise work (two reads of the logits and
the target rows for the statistics, one for the gradient; nothing [chunk, vocab] in float32); elsewhere the
same chunks run as PyTorch ops.

Per scored row i (draft logits z, target logits t over the draft vocab, full-vocab target lse L):
    p = softmax(t), log q = log_softmax(z), ce_i = -sum p log q
    loss = sum_i w_i ce_i / max(D, 1), D = sum_i w_i unless given (data parallel: the sum over all ranks)
    correct = #{i : d2t-map(argmax z) == target argmax}, accept = sum_i sum_x min(exp(t - L), q)
    dloss/dz_i = (q * sum(p) - p) * w_i / max(sum w, 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path below is used
    triton = None


@dataclass
class SoftLabels:
    """The target's next-token distribution at every position, restricted to the draft vocab: what the loss
    matches (built by `specforge.eagle3.ttt.soft_labels`; plain tensors, so this module needs nothing above it)."""

    logits: torch.Tensor  # [B, T, Vd] target logits at the draft-vocab ids (float32)
    lse: torch.Tensor  # [B, T] log-sum-exp over the full target vocab (for expected acceptance)
    argmax: torch.Tensor  # [B, T] target's greedy next token (target id)


# Chunk rows so that one chunk's logits in float32 take at most this many bytes.
CHUNK_BYTES = 256 << 20


def default_chunk(vocab: int, bytes_per_logit: int = 4, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's logits take at most `budget` bytes."""
    return max(1, budget // (bytes_per_logit * vocab))


class HeadGrad:
    """The lm_head gradient of several `fused_soft_ce` calls that share the weight (the TTT steps of one batch),
    summed as the calls run: call i adds coef_i times its gradient, where coef_i is its loss's weight in the
    loss that is backpropagated, and that loss adds `tie(loss)`, a zero whose backward hands the weight the
    sum times the gradient it receives. So the batch keeps one float32 [Vd, H] buffer until backward, not
    one per call; any scale applied to the whole loss afterwards (data parallel's, accumulation's) reaches
    the weight through the tie. Also casts the weight to the matmul dtype once for all the calls."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.acc: Optional[torch.Tensor] = None  # float32 (float64 for float64 inputs); the first call writes it
        self._cast: dict = {}

    def cast(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._cast:
            self._cast[dtype] = self.weight.detach().to(dtype)
        return self._cast[dtype]

    def tie(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` plus a zero whose gradient with respect to the weight is the summed gradient."""
        return loss + _HeadGradTie.apply(self.weight, self, loss.dtype)


class _HeadGradTie(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, sink, dtype):
        ctx.sink, ctx.shape, ctx.w_dtype = sink, weight.shape, weight.dtype
        sink._cast.clear()  # the calls are done: the cast copies are not needed in backward
        return torch.zeros((), dtype=dtype, device=weight.device)

    @staticmethod
    def backward(ctx, g):
        acc, ctx.sink.acc = ctx.sink.acc, None
        if acc is None:  # no call scored a row: a zero gradient, as each call would have given
            return torch.zeros(ctx.shape, dtype=ctx.w_dtype, device=g.device), None, None
        return (acc * g.to(acc.dtype)).to(ctx.w_dtype), None, None


def soft_ce_reference(normed_hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: SoftLabels,
                      b_idx: torch.Tensor, t_idx: torch.Tensor, weight: Optional[torch.Tensor] = None,
                      d2t: Optional[torch.Tensor] = None, denom: Optional[torch.Tensor] = None,
                      tv_weight: float = 0.0):
    """One TTT step, unfused: (weighted mean loss, correct, accept, count). All [N, Vd] tensors are
    materialised; autograd keeps the float32 ones until backward. `denom`: what the weighted sum is divided
    by (default: the sum of the weights; data parallel passes the sum over all ranks). `tv_weight` > 0 adds
    tv_weight times each row's total variation between the target's full next-token distribution and the
    draft's, 1 - sum_x min(p(x), q(x)): one minus the row's expected acceptance, which it trains directly."""
    logits = F.linear(normed_hidden, lm_head_weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logq = F.log_softmax(logits, dim=-1)
    tgt_logits = labels.logits[b_idx, t_idx]
    tgt_arg = labels.argmax[b_idx, t_idx]
    p_full = torch.exp(tgt_logits - labels.lse[b_idx, t_idx].unsqueeze(-1))  # full-vocab target probs
    ce = -(torch.softmax(tgt_logits, dim=-1) * logq).sum(-1)
    row = ce
    if tv_weight:
        row = ce + tv_weight * (1 - torch.minimum(p_full, logq.exp()).sum(-1))
    weight = torch.ones_like(ce) if weight is None else weight.to(ce.dtype)
    loss = (row * weight).sum() / (weight.sum() if denom is None else denom.to(ce.dtype)).clamp(min=1)
    with torch.no_grad():
        arg = logits.argmax(-1)
        if d2t is not None:
            arg = arg + d2t[arg]
        correct = (arg == tgt_arg).sum()
        accept = torch.minimum(p_full, logq.exp()).sum()
    return loss, correct, accept, torch.tensor(len(ce))


def fused_soft_ce(normed_hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: SoftLabels,
                  b_idx: torch.Tensor, t_idx: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  d2t: Optional[torch.Tensor] = None, chunk: Optional[int] = None,
                  use_triton: Optional[bool] = None, recompute: bool = False, denom: Optional[torch.Tensor] = None,
                  head_grad: Optional[HeadGrad] = None, coef: float = 1.0):
    """What `soft_ce_reference` returns, with at most `chunk` rows of logits alive at a time (default: 256 MB
    of logits as the path holds them: float32 on the PyTorch path, the matmul dtype on the Triton path). The
    matmuls run in the autocast dtype when autocast is on for the hidden state's device (as `F.linear`
    would), else in the inputs' common dtype; statistics in at least float32, the lm_head gradient summed
    over chunks in float32. `use_triton`: None = on CUDA when Triton is importable and statistics are
    float32. `recompute`: see the module docstring. `denom`: as in `soft_ce_reference`. The norm stays
    outside: pass norm(hidden). `head_grad` (without recompute): the lm_head gradient goes into it, `coef`
    (> 0) times this loss's own, and none into `lm_head_weight` from this call (see `HeadGrad`)."""
    n, vocab = normed_hidden.shape[0], lm_head_weight.shape[0]
    dev = normed_hidden.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
    else:
        cdt = torch.promote_types(normed_hidden.dtype, lm_head_weight.dtype)
    adt = torch.promote_types(torch.promote_types(cdt, torch.float32), labels.logits.dtype)
    weight = torch.ones(n, dtype=adt, device=normed_hidden.device) if weight is None else weight.to(adt)
    if d2t is None:
        d2t = torch.zeros(vocab, dtype=torch.long, device=normed_hidden.device)
    tgt2d = labels.logits.reshape(-1, vocab)  # a view when contiguous
    rows = b_idx * labels.logits.shape[1] + t_idx
    lse_full = labels.lse[b_idx, t_idx].to(adt)
    tgt_arg = labels.argmax[b_idx, t_idx]
    if use_triton is None:
        use_triton = normed_hidden.is_cuda
    use_triton = bool(use_triton) and triton is not None and normed_hidden.is_cuda and adt == torch.float32
    # The Triton path holds a chunk's logits only in the matmul dtype; the PyTorch path makes float32 copies.
    chunk = int(chunk) if chunk else default_chunk(vocab, cdt.itemsize if use_triton else adt.itemsize)
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: need at least one row per chunk")
    # Gradients in the forward only when a backward will come (not under no_grad, as in evaluation).
    early = not recompute and torch.is_grad_enabled() and (normed_hidden.requires_grad or
                                                           lm_head_weight.requires_grad)
    denom = weight.sum() if denom is None else denom.to(device=weight.device, dtype=adt)
    if head_grad is None and coef != 1.0:
        raise ValueError(f"fused_soft_ce: coef={coef} is the weight of a call sharing head_grad; none is given")
    if head_grad is not None:
        if recompute:
            raise ValueError("fused_soft_ce: head_grad sums gradients made in the forward; recompute makes them "
                             "in backward")
        if not coef > 0:
            raise ValueError(f"fused_soft_ce: coef={coef}: a call sharing head_grad needs a positive weight")
        if lm_head_weight is not head_grad.weight:
            raise ValueError("fused_soft_ce: head_grad was made for another weight")
        sink = head_grad if early else None  # under no_grad there is no gradient to sum
        w_in = lm_head_weight.detach() if early else lm_head_weight
    else:
        sink, w_in = None, lm_head_weight
    loss, correct, accept = _FusedSoftCE.apply(normed_hidden.to(cdt), w_in, tgt2d, rows, weight,
                                               lse_full, tgt_arg, d2t, denom, chunk, use_triton, early, sink,
                                               float(coef))
    return loss, correct, accept, torch.tensor(n)


class _FusedSoftCE(torch.autograd.Function):
    """Inputs: h [N, H] in the matmul dtype, the lm_head weight (any float dtype: cast per call), target rows
    tgt2d [B*T, Vd] picked by `rows`, per-row weight / full-vocab lse / target argmax, d2t, the loss's
    denominator (before the clamp to at least 1)."""

    @staticmethod
    def forward(ctx, h, w_head, tgt2d, rows, weight, lse_full, tgt_arg, d2t, denom, chunk, use_triton, early,
                sink, coef):
        adt = weight.dtype
        n = h.shape[0]
        # With a sink (early mode only) the weight's gradient, coef times this loss's, is added to sink.acc; the
        # hidden state's is kept coef times too (one logits gradient serves both) and divided back in backward.
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or sink is not None
        # Without recompute the gradients for a unit loss gradient are formed here, chunk by chunk, right after
        # the chunk's statistics; backward only scales them.
        early = early and (need_h or need_w)
        with torch.autocast(h.device.type, enabled=False):
            w_c = sink.cast(h.dtype) if sink is not None else w_head.to(h.dtype)
            lse_z = h.new_empty(n, dtype=adt)
            lse_t, sum_p, ce, acc = (torch.empty_like(lse_z) for _ in range(4))
            arg = torch.empty(n, dtype=torch.long, device=h.device)
            denom = denom.clamp(min=1)
            stats = _stats_triton if use_triton else _stats_torch
            fresh = True  # the first chunk writes grad_w instead of adding to it
            if early:
                scale = weight / denom if sink is None else weight * (coef / denom)
                grad_h = torch.empty_like(h) if need_h else None
                grad_w = None
                if need_w and sink is None:
                    grad_w = _new_grad_w(w_head, h)
                elif need_w and n:
                    if sink.acc is None:
                        sink.acc = _new_grad_w(w_head, h)
                    else:
                        fresh = False
                    grad_w = sink.acc
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                z = h[s:e] @ w_c.t()
                stats(z, tgt2d, rows[s:e], lse_full[s:e], adt, lse_z[s:e], arg[s:e], lse_t[s:e], sum_p[s:e],
                      ce[s:e], acc[s:e])
                if early:
                    _chunk_grads(z, h, w_c, s, e, tgt2d, rows, lse_z, lse_t, sum_p, scale, grad_h, grad_w,
                                 use_triton, first=fresh and s == 0)
                del z
            loss = (ce * weight).sum() / denom
            correct = ((arg + d2t[arg]) == tgt_arg).sum()
            accept = acc.sum()
        if early:
            ctx.save_for_backward(grad_h, grad_w if sink is None else None)
        else:
            ctx.save_for_backward(h, w_head, tgt2d, rows, weight, lse_z, lse_t, sum_p, denom)
        ctx.chunk, ctx.use_triton, ctx.early, ctx.w_dtype = chunk, use_triton, early, w_head.dtype
        ctx.coef = coef if sink is not None else 1.0
        ctx.mark_non_differentiable(correct, accept)
        return loss, correct, accept

    @staticmethod
    def backward(ctx, g_loss, _g_correct, _g_accept):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 12
        if ctx.early:
            grad_h, grad_w = ctx.saved_tensors
            g = g_loss.to(torch.promote_types(g_loss.dtype, torch.float32))  # a bf16 step weight would round
            if ctx.coef != 1.0:
                g = g / ctx.coef
            return ((grad_h.to(g.dtype) * g).to(grad_h.dtype) if need_h else None,
                    (grad_w * g).to(ctx.w_dtype) if need_w else None,
                    *none)
        h, w_head, tgt2d, rows, weight, lse_z, lse_t, sum_p, denom = ctx.saved_tensors
        if not (need_h or need_w):
            return None, None, *none
        n, chunk = h.shape[0], ctx.chunk
        with torch.autocast(h.device.type, enabled=False):
            w_c = w_head.to(h.dtype)
            scale = weight * (g_loss.to(weight.dtype) / denom)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = _new_grad_w(w_head, h) if need_w else None
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                z = h[s:e] @ w_c.t()
                _chunk_grads(z, h, w_c, s, e, tgt2d, rows, lse_z, lse_t, sum_p, scale, grad_h, grad_w,
                             ctx.use_triton, first=s == 0)
                del z
        return grad_h, (grad_w.to(w_head.dtype) if need_w else None), *none


def _new_grad_w(w_head, h):
    """The lm_head gradient accumulator: float32 at least (float64 for float64 inputs)."""
    dt = torch.promote_types(torch.promote_types(h.dtype, torch.float32), w_head.dtype)
    if h.shape[0] == 0:
        return torch.zeros(w_head.shape, dtype=dt, device=h.device)
    return torch.empty(w_head.shape, dtype=dt, device=h.device)  # the first chunk writes it


def _chunk_grads(z, h, w_c, s, e, tgt2d, rows, lse_z, lse_t, sum_p, scale, grad_h, grad_w, use_triton, first):
    """The gradient of chunk rows s:e from their logits z (overwritten): grad_h[s:e] = gz @ W and
    grad_w (+)= gz^T @ h[s:e] (written by the first chunk), gz = (softmax(z) * sum p - p) * scale."""
    grad = _grad_triton if use_triton else _grad_torch
    gz = grad(z, tgt2d, rows[s:e], lse_z[s:e], lse_t[s:e], sum_p[s:e], scale[s:e])
    if grad_h is not None:
        torch.mm(gz, w_c, out=grad_h[s:e])
    if grad_w is not None:
        _accumulate_mm(grad_w, gz.t(), h[s:e], first)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc = a @ b (first) or acc += a @ b, with acc in float32 (or float64) whatever the dtype of a and b.
    On CUDA a bf16/fp16 product goes into the float32 buffer from the matmul's epilogue (no temporary)."""
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif acc.is_cuda:
        if first:
            torch.mm(a, b, out_dtype=acc.dtype, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    elif first:
        acc.copy_(a @ b)
    else:
        acc.add_((a @ b).to(acc.dtype))


# PyTorch path: a chunk's row statistics and its logits gradient.

def _stats_torch(z, tgt2d, rows, lse_full, adt, lse_z, arg, lse_t, sum_p, ce, acc):
    z = z.to(adt)
    t = tgt2d[rows].to(adt)
    lse_z.copy_(torch.logsumexp(z, -1))
    arg.copy_(z.argmax(-1))
    lse_t.copy_(torch.logsumexp(t, -1))
    logq = z - lse_z.unsqueeze(-1)  # z itself is left as it is: the gradient may read it next
    p = torch.exp(t - lse_t.unsqueeze(-1))
    sum_p.copy_(p.sum(-1))
    ce.copy_(-(p * logq).sum(-1))
    del p
    p_full = t.sub_(lse_full.unsqueeze(-1)).exp_()
    acc.copy_(torch.minimum(p_full, logq.exp_()).sum(-1))


def _grad_torch(z, tgt2d, rows, lse_z, lse_t, sum_p, scale):
    adt = lse_z.dtype
    q = z.to(adt).sub_(lse_z.unsqueeze(-1)).exp_() if z.dtype != adt else z.sub_(lse_z.unsqueeze(-1)).exp_()
    p = tgt2d[rows].to(adt).sub_(lse_t.unsqueeze(-1)).exp_()
    g = q.mul_(sum_p.unsqueeze(-1)).sub_(p).mul_(scale.unsqueeze(-1))
    return g.to(z.dtype)


# Triton path (CUDA, float32 statistics).

if triton is not None:

    @triton.jit
    def _soft_ce_stats_kernel(z_ptr, t_ptr, rows_ptr, lse_full_ptr, lse_z_ptr, arg_ptr, lse_t_ptr, sum_p_ptr,
                              ce_ptr, acc_ptr, V, stride_z, stride_t, BLOCK: tl.constexpr):
        """One program per row. Pass 1: per-lane online max / sum of exp for z and t, and z's argmax
        (first index among ties). Pass 2, with both log-sum-exps known: sum p, sum p log q and
        sum min(p_full, q)."""
        i = tl.program_id(0)
        r = tl.load(rows_ptr + i).to(tl.int64)
        z_row = z_ptr + i.to(tl.int64) * stride_z
        t_row = t_ptr + r * stride_t
        lanes = tl.arange(0, BLOCK)
        mz = tl.full([BLOCK], -1e30, tl.float32)
        sz = tl.zeros([BLOCK], tl.float32)
        mt = tl.full([BLOCK], -1e30, tl.float32)
        st = tl.zeros([BLOCK], tl.float32)
        bz = tl.full([BLOCK], float("-inf"), tl.float32)
        bi = tl.zeros([BLOCK], tl.int32)
        for off in range(0, V, BLOCK):
            cols = off + lanes
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=-1e30).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=-1e30).to(tl.float32)
            better = mask & (z > bz)
            bi = tl.where(better, cols, bi)
            bz = tl.where(better, z, bz)
            nz = tl.maximum(mz, z)
            sz = sz * tl.exp(mz - nz) + tl.where(mask, tl.exp(z - nz), 0.0)
            mz = nz
            nt = tl.maximum(mt, t)
            st = st * tl.exp(mt - nt) + tl.where(mask, tl.exp(t - nt), 0.0)
            mt = nt
        m = tl.max(mz, 0)
        lse_z = m + tl.log(tl.sum(sz * tl.exp(mz - m), 0))
        m = tl.max(mt, 0)
        lse_t = m + tl.log(tl.sum(st * tl.exp(mt - m), 0))
        best = tl.max(bz, 0)
        arg = tl.min(tl.where(bz == best, bi, V), 0)
        lse_f = tl.load(lse_full_ptr + i)
        sp = tl.zeros([BLOCK], tl.float32)
        spl = tl.zeros([BLOCK], tl.float32)
        ac = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + lanes
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            logq = z - lse_z
            p = tl.where(mask, tl.exp(t - lse_t), 0.0)
            sp += p
            spl += p * logq
            ac += tl.where(mask, tl.minimum(tl.exp(t - lse_f), tl.exp(logq)), 0.0)
        tl.store(lse_z_ptr + i, lse_z)
        tl.store(arg_ptr + i, arg.to(tl.int64))
        tl.store(lse_t_ptr + i, lse_t)
        tl.store(sum_p_ptr + i, tl.sum(sp, 0))
        tl.store(ce_ptr + i, -tl.sum(spl, 0))
        tl.store(acc_ptr + i, tl.sum(ac, 0))

    @triton.jit
    def _soft_ce_grad_kernel(z_ptr, t_ptr, rows_ptr, lse_z_ptr, lse_t_ptr, sum_p_ptr, scale_ptr, V, stride_z,
                             stride_t, BLOCK: tl.constexpr):
        """In place: z <- (softmax(z) * sum p - p) * scale, row by row, BLOCK columns a program."""
        i = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < V
        r = tl.load(rows_ptr + i).to(tl.int64)
        z_row = z_ptr + i.to(tl.int64) * stride_z
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + r * stride_t + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.exp(z - tl.load(lse_z_ptr + i))
        p = tl.exp(t - tl.load(lse_t_ptr + i))
        g = (q * tl.load(sum_p_ptr + i) - p) * tl.load(scale_ptr + i)
        tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


def _stats_triton(z, tgt2d, rows, lse_full, adt, lse_z, arg, lse_t, sum_p, ce, acc):
    c, vocab = z.shape
    if c == 0:
        return
    block = min(2048, triton.next_power_of_2(vocab))
    _soft_ce_stats_kernel[(c,)](z, tgt2d, rows, lse_full, lse_z, arg, lse_t, sum_p, ce, acc, vocab, z.stride(0),
                                tgt2d.stride(0), BLOCK=block, num_warps=8)


def _grad_triton(z, tgt2d, rows, lse_z, lse_t, sum_p, scale):
    c, vocab = z.shape
    if c == 0:
        return z
    block = min(2048, triton.next_power_of_2(vocab))
    _soft_ce_grad_kernel[(c, triton.cdiv(vocab, block))](z, tgt2d, rows, lse_z, lse_t, sum_p, scale, vocab,
                                                          z.stride(0), tgt2d.stride(0), BLOCK=block, num_warps=8)
    return z
