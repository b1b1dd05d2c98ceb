"""The target's soft labels from a chunk of its full-vocab logits in one pass: per row the log-sum-exp over the
whole vocab, the argmax, and the logits at the draft vocab's ids in float32.

Done op by op (`label_rows_reference`) that is a float32 copy of the [rows, vocab] logits, a logsumexp, an
argmax and a gather: several reads and writes of 0.5 GB per 1,024 rows at a 128K vocab, in the target's share of
every training step. The Triton kernel reads each row once (in its own dtype) and then the draft ids' columns
again, which the cache mostly still holds. The logits and the argmax (first index among ties, as torch's) are the
same bits either way; the lse differs by float32 rounding (an online sum per lane instead of max-then-sum).
`label_rows` takes the kernel on CUDA for 16- and 32-bit floats and the reference elsewhere (the CPU, float64)."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None


def label_rows_reference(full: torch.Tensor, draft_ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
                         arg: torch.Tensor) -> None:
    """Plain PyTorch: writes `logits` [C, Vd] = full[:, draft_ids], `lse` [C] and `arg` [C] from `full` [C, V]
    (the matmul's dtype), in `logits`' dtype."""
    f = full.to(logits.dtype)
    lse.copy_(torch.logsumexp(f, dim=-1))
    arg.copy_(f.argmax(-1))
    logits.copy_(f[:, draft_ids])


def label_rows(full: torch.Tensor, draft_ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
               arg: torch.Tensor) -> None:
    """What `label_rows_reference` writes, by the Triton kernel where it runs."""
    if triton is None or not full.is_cuda or logits.dtype != torch.float32 or full.dtype == torch.float64:
        return label_rows_reference(full, draft_ids, logits, lse, arg)
    return label_rows_triton(full, draft_ids, logits, lse, arg)


def label_rows_triton(full, draft_ids, logits, lse, arg) -> None:
    """The kernel's launch (also under Triton's interpreter, on CPU tensors): one program per row; `logits`
    float32 with unit column stride, `lse` float32, `arg` int64."""
    rows, vocab = full.shape
    if rows == 0:
        return
    full = full if full.stride(-1) == 1 else full.contiguous()
    _label_rows_kernel[(rows,)](full, draft_ids, logits, lse, arg, vocab, draft_ids.numel(), full.stride(0),
                                logits.stride(0), BLOCK=4096, BLOCK_D=2048, num_warps=8)


if triton is not None:

    @triton.jit
    def _label_rows_kernel(x_ptr, ids_ptr, logits_ptr, lse_ptr, arg_ptr, V, Vd, stride_x, stride_o,
                           BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per row. Pass 1 over the vocab: per lane an online max and sum of exp, and the first
        index of the lane's largest value. Pass 2: the draft ids' columns, converted, stored."""
        i = tl.program_id(0)
        row = x_ptr + i.to(tl.int64) * stride_x
        lanes = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], -1e30, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        bx = tl.full([BLOCK], float("-inf"), tl.float32)
        bi = tl.zeros([BLOCK], tl.int32)
        for off in range(0, V, BLOCK):
            cols = off + lanes
            mask = cols < V
            x = tl.load(row + cols, mask=mask, other=-1e30).to(tl.float32)
            better = mask & (x > bx)
            bi = tl.where(better, cols, bi)
            bx = tl.where(better, x, bx)
            nm = tl.maximum(m, x)
            s = s * tl.exp(m - nm) + tl.where(mask, tl.exp(x - nm), 0.0)
            m = nm
        top = tl.max(m, 0)
        tl.store(lse_ptr + i, top + tl.log(tl.sum(s * tl.exp(m - top), 0)))
        best = tl.max(bx, 0)
        tl.store(arg_ptr + i, tl.min(tl.where(bx == best, bi, V), 0).to(tl.int64))
        out = logits_ptr + i.to(tl.int64) * stride_o
        for off in range(0, Vd, BLOCK_D):
            d = off + tl.arange(0, BLOCK_D)
            dm = d < Vd
            ids = tl.load(ids_ptr + d, mask=dm, other=0)
            tl.store(out + d, tl.load(row + ids, mask=dm, other=0.0).to(tl.float32), mask=dm)
