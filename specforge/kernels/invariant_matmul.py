"""Batch-invariant matmul: every output element is summed in the same order whatever the number of rows.

cuBLAS picks its kernel (tile shape, split-K) from the problem size, so the row of a 1-token decode step and
the same row inside a 6-token verify pass are summed differently and can differ in the last bit. Here the
tiles are fixed (per dtype), and so is the split of K: it depends on (N, K) and the GPU, never on M. A row's
result then depends only on that row, which is what makes speculative greedy output equal plain greedy output.

`matmul(a, b, bias)` takes [M, K] x [K, N] (or batched [B, M, K] x [B, K, N]) with any strides, accumulates in
float32 and returns a's dtype. On the CPU it runs `matmul_reference`: one fixed-shape vector product per row
(invariant by construction, slow, for tests). A persistent kernel walks the output tiles; with a K split,
each split writes float32 partial sums and a second kernel adds them in split order.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# Fixed tile shapes per input dtype: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Two settings, each
# batch-invariant on its own: decoding (few rows; K split by the weight's shape) and training (many rows;
# wider tiles, no split). `scripts/bench_invariant.py` measured the choice (docs/benchmarks.md).
TILES = {torch.bfloat16: (128, 128, 64, 8, 3), torch.float16: (128, 128, 64, 8, 3),
         torch.float32: (64, 64, 32, 4, 2)}
TRAIN_TILES = {**TILES, torch.bfloat16: (128, 256, 64, 8, 3), torch.float16: (128, 256, 64, 8, 3)}
MIN_SPLIT = 512  # the smallest K range one split reduces


def matmul_reference(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row by row in float32 (float64 stays float64): the same call shape for every row, so a row's result
    cannot depend on its neighbours. Returns a's dtype."""
    acc = torch.promote_types(a.dtype, torch.float32)
    bb = b.to(acc)
    if a.dim() == 3:
        return torch.stack([matmul_reference(a[i], b[i], bias) for i in range(a.shape[0])])
    out = torch.empty(a.shape[0], b.shape[1], dtype=acc, device=a.device)
    for i in range(a.shape[0]):
        out[i] = torch.mv(bb.t(), a[i].to(acc))
    if bias is not None:
        out += bias.to(acc)
    return out.to(a.dtype)


def num_splits(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """How many K ranges each output tile is summed over: enough programs to fill the GPU when there are
    few column tiles (a decode step has a single row tile), and never a range under MIN_SPLIT. A function of
    the weight's shape and the GPU only."""
    col_tiles = triton.cdiv(n, block_n)
    if col_tiles * 2 >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, col_tiles), k // MIN_SPLIT))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


if triton is not None:

    @triton.jit
    def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K, k_per_split,
                       s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cs, s_cb, s_cm, s_cn,
                       num_batches, splits, num_programs,
                       HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Persistent: program p takes tiles p, p + P, ... of (batch, split, row tile, column tile). Each tile
        sums its K range in BLOCK_K steps, in order; nothing about it depends on M."""
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_batch = splits * tiles_m * tiles_n
        total = num_batches * per_batch
        for tile in range(pid, total, num_programs):
            bi = tile // per_batch
            rest = tile % per_batch
            sp = rest // (tiles_m * tiles_n)
            rest = rest % (tiles_m * tiles_n)
            tm = rest // tiles_n
            tn = rest % tiles_n
            rm = tm * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
            k_lo = sp * k_per_split
            k_hi = tl.minimum(k_lo + k_per_split, K)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptr + bi * s_ab + rm[:, None] * s_am + rk[None, :] * s_ak,
                            mask=(rm[:, None] < M) & (rk[None, :] < k_hi), other=0.0)
                b = tl.load(b_ptr + bi * s_bb + rk[:, None] * s_bk + rn[None, :] * s_bn,
                            mask=(rk[:, None] < k_hi) & (rn[None, :] < N), other=0.0)
                if IEEE:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            out_mask = (rm[:, None] < M) & (rn[None, :] < N)
            if PARTIAL:
                tl.store(c_ptr + sp * s_cs + bi * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn, acc,
                         mask=out_mask)
            else:
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
                tl.store(c_ptr + bi * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn,
                         acc.to(c_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _sum_splits_kernel(p_ptr, c_ptr, bias_ptr, numel, N, splits, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr):
        """c = p[0] + p[1] + ... (+ bias), in split order, element-wise."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
        for s in range(1, splits):
            acc += tl.load(p_ptr + s * numel + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _triton_matmul(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], split_k: bool = True,
                   tiles: Optional[tuple] = None) -> torch.Tensor:
    batched = a.dim() == 3
    a3, b3 = (a, b) if batched else (a[None], b[None])
    nb, m, k = a3.shape
    n = b3.shape[2]
    out = torch.empty(nb, m, n, dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out if batched else out[0]
    if k == 0:
        out.zero_()
        if bias is not None:
            out += bias
        return out if batched else out[0]
    bm, bn, bk, warps, stages = tiles or TILES[a.dtype]
    sms = _sm_count(a.device.index or 0)
    splits = num_splits(n, k, bn, bk, sms) if split_k else 1
    k_per_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_per_split)
    tiles = nb * splits * triton.cdiv(m, bm) * triton.cdiv(n, bn)
    programs = min(tiles, sms)
    partial = splits > 1
    c = torch.empty(splits, nb, m, n, dtype=torch.float32, device=a.device) if partial else out
    cs = c.stride() if partial else (0, *c.stride())
    _matmul_kernel[(programs,)](
        a3, b3, c, bias if bias is not None else a3, m, n, k, k_per_split,
        *a3.stride(), *b3.stride(), *cs, nb, splits, programs,
        HAS_BIAS=bias is not None and not partial, PARTIAL=partial, IEEE=a.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if partial:
        numel = nb * m * n
        block = 1024
        _sum_splits_kernel[(triton.cdiv(numel, block),)](c, out, bias if bias is not None else c, numel, n,
                                                         splits, HAS_BIAS=bias is not None, BLOCK=block)
    return out if batched else out[0]


def matmul(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
           training: bool = False) -> torch.Tensor:
    """a @ b (+ bias), batch-invariant: [M, K] x [K, N] or [B, M, K] x [B, K, N]. `training=True` takes the
    training setting (TRAIN_TILES, no K split: the split's float32 partial sums cost more than the
    parallelism they buy when there are many rows); results differ from the decoding setting's in the last
    bits, and each setting is invariant on its own."""
    if a.dtype != b.dtype:
        raise TypeError(f"invariant matmul: dtypes differ ({a.dtype} and {b.dtype})")
    if a.is_cuda and triton is not None and a.dtype in TILES:
        return _triton_matmul(a, b, bias, split_k=not training, tiles=(TRAIN_TILES if training else TILES)[a.dtype])
    return matmul_reference(a, b, bias)
