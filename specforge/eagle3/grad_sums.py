"""The TTT steps' weight gradients summed in place (`train.sum_weight_grads`).

The unroll runs the draft layer `ttt_length` times on the same projection matrices (`UnrollWeights`). Under
plain autograd each step's backward writes its own weight gradient dW_k = g_k^T x_k, and autograd adds it
to the running sum: per weight and step, a write of dW_k, then a read of it and of the sum and a write of
the sum, with a rounding to bf16 at each of the two writes. Here each step's matmul adds g_k^T x_k into one
buffer as cuBLAS writes it (`addmm_`, beta = 1): a read and a write of the buffer per step, half the bytes,
and one rounding per step. On the 8B shape the summed matrices are 243M entries (486 MB in bf16), seven
times a step.

Two autograd functions carry it:
- `sunk(w)`, once per batch: `w` itself with a `Sink` attached, whose backward hands on the sum that the steps
  left in the sink (it runs after every step's backward, as the steps all read its output);
- `linear(x, w)`, per step: `F.linear`, whose backward adds its weight gradient to `w`'s sink and returns
  none for `w`.
`linear` runs outside torch.compile (a graph break in the compiled halves): a compiled backward cannot
write into a buffer the forward was handed."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class Sink:
    """The running sum of one weight's gradient over one unroll's steps (None until the first step adds)."""

    __slots__ = ("total",)

    def __init__(self):
        self.total: Optional[torch.Tensor] = None

    def add(self, g: torch.Tensor, x: torch.Tensor) -> None:
        """Add g^T x (g [rows, out], x [rows, in]): the first step's product is the buffer, later ones add
        into it in place."""
        if self.total is None:
            self.total = g.t().mm(x)
        else:
            self.total.addmm_(g.t(), x)


_SINK = "_specforge_grad_sink"  # the attribute of a sunk weight that holds its Sink


class _Sunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, sink):
        ctx.sink = sink
        ctx.set_materialize_grads(False)  # the steps give no gradient through autograd: None, not zeros
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        total, ctx.sink.total = ctx.sink.total, None
        if g is not None:  # an autograd use besides the steps (none in the unroll): both count
            total = g if total is None else total + g
        return total, None


def sunk(w: torch.Tensor) -> torch.Tensor:
    """`w` (which requires grad) as the unroll's steps read it: `linear` sums their weight gradients into its
    sink, and this node's backward passes the sum back to `w`."""
    sink = Sink()
    out = _Sunk.apply(w, sink)
    setattr(out, _SINK, sink)
    return out


class _SinkLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, sink):
        x = x.to(w.dtype)  # what autocast would cast it to: the matmul's dtype is the weight's (already cast)
        ctx.save_for_backward(x, w)
        ctx.sink = sink
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        ctx.sink.add(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))
        return (g.matmul(w) if ctx.needs_input_grad[0] else None), None, None


@torch.compiler.disable
def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for a `w` from `sunk`: under autograd its weight gradient goes to the sink. Never traced
    by torch.compile (the halves break around it), so the sink stays a plain attribute no guard looks at."""
    if not torch.is_grad_enabled():
        return F.linear(x, w)
    return _SinkLinear.apply(x, w, getattr(w, _SINK))
