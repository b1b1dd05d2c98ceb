"""Batch-invariant RMSNorm: one program per row, the row's sum of squares in a fixed order.

The result is bitwise what HF's LlamaRMSNorm computes in formula (statistics in float32, the normalised row
cast back to the input dtype, then times the weight), but PyTorch's own reduction may split a row over
several blocks when there are few rows; this kernel never does. Backward (the draft trains through its
norms) recomputes the reference formula under autograd: deterministic, and rarely on the hot path.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama's formula (float64 stays float64)."""
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
        normed = (xf * rstd).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(y_ptr + row * N + cols, out.to(y_ptr.dtype.element_ty), mask=mask)


def _triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rows = xc.numel() // max(n, 1)
    if rows:
        _rms_norm_kernel[(rows,)](xc, weight.contiguous(), out, n, eps, BLOCK=triton.next_power_of_2(n),
                                  num_warps=4 if n <= 4096 else 8)
    return out


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _triton_rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            xg = x.detach().requires_grad_(ctx.needs_input_grad[0])
            wg = weight.detach().requires_grad_(ctx.needs_input_grad[1])
            y = rms_norm_reference(xg, wg, ctx.eps)
            wanted = [t for t in (xg, wg) if t.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, grad))
        return (next(grads) if ctx.needs_input_grad[0] else None,
                next(grads) if ctx.needs_input_grad[1] else None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, batch-invariant on CUDA (the reference elsewhere, and for float64,
    which the kernel does not serve)."""
    if x.is_cuda and triton is not None and x.dtype != torch.float64 and weight.dtype != torch.float64:
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
