"""Batch-invariant softmax and log-softmax over the last dimension: one program per row, which walks the
row in fixed blocks (a running max and sum, then the output). A row's result never depends on how many
rows there are, unlike PyTorch's kernels, which pick their reduction layout from the tensor's shape."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK = 4096


def softmax_reference(x: torch.Tensor, log: bool = False) -> torch.Tensor:
    """In float32 at least; returns x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    z = xf - xf.amax(-1, keepdim=True)
    lse = z.exp().sum(-1, keepdim=True).log()
    return (z - lse if log else (z - lse).exp()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _softmax_kernel(x_ptr, y_ptr, N, LOG: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * N
        cols = tl.arange(0, BLOCK)
        m = tl.full((BLOCK,), float("-inf"), tl.float32)  # per lane: the running max and rescaled sum
        s = tl.zeros((BLOCK,), tl.float32)
        for c0 in range(0, N, BLOCK):
            x = tl.load(x_row + c0 + cols, mask=c0 + cols < N, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - safe) + tl.exp(x - safe)
            m = m_new
        row_max = tl.max(m, axis=0)
        total = tl.sum(s * tl.exp(m - row_max), axis=0)
        lse = row_max + tl.log(total)
        for c0 in range(0, N, BLOCK):
            mask = c0 + cols < N
            x = tl.load(x_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            y = x - lse
            if not LOG:
                y = tl.exp(y)
            tl.store(y_ptr + row * N + c0 + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _triton_softmax(x: torch.Tensor, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    n = x.shape[-1]
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rows = xc.numel() // max(n, 1)
    if rows:
        block = min(BLOCK, triton.next_power_of_2(n))
        _softmax_kernel[(rows,)](xc, out, n, LOG=log, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out


def softmax(x: torch.Tensor, dim: int = -1, log: bool = False, out_dtype=None) -> torch.Tensor:
    """(Log-)softmax along `dim`, batch-invariant on CUDA (the reference elsewhere and for float64)."""
    out_dtype = out_dtype or x.dtype
    dim = dim % x.dim() if x.dim() else 0
    last = x.dim() == 0 or dim == x.dim() - 1
    xt = x if last else x.movedim(dim, -1)
    if x.is_cuda and triton is not None and x.dtype != torch.float64:
        y = _triton_softmax(xt, log, out_dtype)
    else:
        y = softmax_reference(xt.to(out_dtype) if out_dtype != x.dtype else xt, log)
    return y if last else y.movedim(-1, dim)
