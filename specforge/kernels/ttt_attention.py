"""Attention of one TTT step without a [T, T] score matrix per head.

At TTT step k the query at position t sees the step-0 keys at positions <= t (causal) and, for each step
j = 1..k, step j's key at position t itself (the diagonal). The plain PyTorch form
(`ttt_attention_reference`) builds float scores [B, Hkv, G, T, T] per step and autograd keeps them for
backward for every step of the unroll: at T=2048 with 32 heads that is gigabytes per step. The flex form
(`ttt_attention_flex`) runs FlexAttention over the step keys laid end to end, [K0; K1; ...; Kk] of length
T*(k+1), with a block-sparse mask; its fused kernel keeps only the output and a log-sum-exp per row, and
skips the key blocks that the mask empties (off the diagonal of every block j > 0, above the diagonal of
block 0). The sdpa form (`ttt_attention_sdpa`) runs aten's causal flash attention over the step-0 keys only
and merges the diagonal keys in through the log-sum-exps: the causal part is almost all the work, and in the
8B training step's profile on an H200 the target's causal cuDNN attention took 0.08 ms a layer against flex's
0.42 ms a TTT step (forward; docs/benchmarks.md, twenty-seventh session). Whether the merged form keeps that
gain is what scripts/bench_ttt_attention.py measures: with the merge compiled by torch.compile it did not (an
H100, twenty-ninth session), so the merge is Triton kernels (`ttt_diagonal`). `ttt_attention` picks one: "auto"
is sdpa on CUDA for wide queries (flex for narrow ones, packed rows and under deterministic algorithms), the
reference on the CPU.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from .ttt_diagonal import diagonal_backward, merge_diagonal

__all__ = ["ttt_attention", "ttt_attention_reference", "ttt_attention_flex", "ttt_attention_sdpa", "ttt_block_mask"]


def ttt_attention_reference(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                            doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B, Hq, T, D]; keys/values: one [B, Hkv, T, D] per step 0..k. Query heads are grouped by their kv
    head (GQA) instead of repeating K/V. Scores and softmax in at least float32. The diagonal scores are
    row-wise dot products, so no [T, T*k] mask is built, but the causal block is dense [T, T]. `doc_ids`
    [B, T] (packed rows): the causal block stays inside the query's conversation."""
    b, hq, t, d = q.shape
    hk = keys[0].shape[1]
    q = q.view(b, hk, hq // hk, t, d)  # group query heads by their kv head
    scale = d ** -0.5
    k0, v0 = keys[0].unsqueeze(2), values[0].unsqueeze(2)
    s0 = (q @ k0.transpose(-1, -2)) * scale  # [b, hk, g, t, t]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if doc_ids is not None:
        causal = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None, None]  # [b, 1, 1, t, t]
    s0 = s0.masked_fill(~causal, float("-inf"))
    diag = [(q * kj.unsqueeze(2)).sum(-1, keepdim=True) * scale for kj in keys[1:]]  # [b, hk, g, t, 1]
    scores = torch.cat([s0, *diag], dim=-1)
    p = torch.softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), dim=-1).to(q.dtype)
    out = p[..., :t] @ v0
    for j, vj in enumerate(values[1:]):
        out = out + p[..., t + j:t + j + 1] * vj.unsqueeze(2)
    return out.reshape(b, hq, t, d)


# ---------------------------------------------------------------------------------------------------------
# FlexAttention

_MASK_CACHE_SIZE = 256  # 7 masks per length; training pads lengths to multiples of 128, so few lengths
_mask_cache: "OrderedDict[tuple, object]" = OrderedDict()
_compiled_flex = None


def _ttt_mask_mod(seq_len: torch.Tensor):
    """kv index n of [K0; K1; ...]: block 0 (n < T) is causal, n <= q; block j > 0 holds only the diagonal,
    n - j*T == q. Both are `n <= q or n % T == q` (in block 0, n % T == q implies n == q; in blocks j > 0,
    n > q always). The length is a 0-d tensor, not a Python int, so a compiled flex_attention sees it as a
    captured buffer and does not recompile (guard on a constant) for every new T; the mask needs no k."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx % seq_len == q_idx)

    return mask_mod


def _packed_ttt_mask_mod(seq_len: torch.Tensor, doc_ids: torch.Tensor):
    """`_ttt_mask_mod` for packed rows: the causal block 0 only inside the query's conversation (doc_ids
    [B, T]); the diagonal blocks are unchanged (a position always sees its own later-step keys)."""

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = doc_ids[b, kv_idx % seq_len] == doc_ids[b, q_idx]
        return ((kv_idx <= q_idx) & same_doc) | (kv_idx % seq_len == q_idx)

    return mask_mod


def ttt_block_mask(t: int, k: int, device, doc_ids: Optional[torch.Tensor] = None) \
        -> "torch.nn.attention.flex_attention.BlockMask":
    """The BlockMask of step k for length t (cached: create_block_mask evaluates the mask densely, a
    [T, T*(k+1)] boolean, and reduces it to blocks, which costs more than the attention at small T). With
    `doc_ids` (packed rows) the mask depends on the batch's layout, so it is built per call, not cached."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device)
    if doc_ids is not None:
        seq_len = torch.tensor(t, dtype=torch.int64, device=device)
        return create_block_mask(_packed_ttt_mask_mod(seq_len, doc_ids), doc_ids.shape[0], None, t, t * (k + 1),
                                 device=device)
    key = (t, k, device)
    bm = _mask_cache.get(key)
    if bm is not None:
        _mask_cache.move_to_end(key)
        return bm
    seq_len = torch.tensor(t, dtype=torch.int64, device=device)
    bm = create_block_mask(_ttt_mask_mod(seq_len), None, None, t, t * (k + 1), device=device)
    _mask_cache[key] = bm
    if len(_mask_cache) > _MASK_CACHE_SIZE:
        _mask_cache.popitem(last=False)
    return bm


RECOMPILE_LIMIT = 64


def _compiled_flex_attention():
    """torch.compile(flex_attention), built on first use: without compile, flex_attention runs an unfused
    implementation that materialises the full score matrix (the very thing to avoid). Shapes are left to
    dynamo's automatic dynamic: T changes from batch to batch and the kv length with k, so after the first
    recompile the lengths become symbolic instead of compiling one kernel per length.

    Each new regime still costs a graph: a batch of one row, a row of one 128-token block (dynamo
    specialises sizes 0 and 1), every block-mask tensor's first size change, grad or no grad (eval). Real
    data meets more than dynamo's default limit of 8 graphs per function, after which flex falls back to the
    unfused path for good (seen on a 4-GPU run of variable-length conversations). The count is bounded, so
    the limit is raised instead."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def _flex_eager_with_grad(q, k, v, block_mask, scale):
    """CPU (tests only). The public flex_attention raises NotImplementedError on CPU whenever an input
    requires grad, even under no_grad (its `_validate_device` check: the CPU kernel has no backward). The
    operator under it (torch._higher_order_ops.flex_attention) has a dense eager implementation with autograd, the same
    math the public eager path runs, so call it directly: it checks this module's mask and math, not
    the fused kernel. Kernel options are the public defaults (the dense path reads none of them)."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_hop

    options = {"BACKEND": "AUTO", "PRESCALE_QK": False, "ROWS_GUARANTEED_SAFE": False,
               "BLOCKS_ARE_CONTIGUOUS": False, "WRITE_DQ": True, "OUTPUT_LOGSUMEXP": True, "OUTPUT_MAX": False}
    out, _lse, _max = flex_hop(q, k, v, lambda score, b, h, m, n: score, block_mask.as_tuple(), scale, options)
    return out


def ttt_attention_flex(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                       doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same result as `ttt_attention_reference`, via FlexAttention over [K0; ...; Kk] (GQA by
    enable_gqa). On CUDA the compiled kernel; elsewhere flex's eager (dense) path, for checking equality.
    Flex needs q, k and v of one dtype: under autocast q/k/v may differ (rope, casts), so all take the
    autocast dtype when autocast is on, else q's dtype."""
    from torch.nn.attention.flex_attention import flex_attention

    b, hq, t, d = q.shape
    steps = len(keys)
    dtype = q.dtype
    if torch.is_autocast_enabled(q.device.type) and q.dtype in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.get_autocast_dtype(q.device.type)
    q = q.to(dtype)
    k = torch.cat([kj.to(dtype) for kj in keys], dim=2) if steps > 1 else keys[0].to(dtype)
    v = torch.cat([vj.to(dtype) for vj in values], dim=2) if steps > 1 else values[0].to(dtype)
    block_mask = ttt_block_mask(t, steps - 1, q.device, doc_ids)
    scale = d ** -0.5
    if q.device.type == "cuda":
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    if q.requires_grad or k.requires_grad or v.requires_grad:  # refused by the public API, even under no_grad
        return _flex_eager_with_grad(q, k, v, block_mask, scale)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


# ---------------------------------------------------------------------------------------------------------
# Causal flash attention merged with the diagonal

_flash_gqa: dict = {}  # device type -> whether aten's flash kernel takes fewer kv heads than q heads


def _flash_forward(q, k, v, scale):
    """Causal flash attention of q [B, Hq, T, D] and k, v [B, Hk, T, D]: output, log-sum-exp [B, Hq, T]
    (float32 for 16-bit inputs), what its backward needs, and whether k, v went in repeated to Hq heads (only
    where the kernel lacks grouped-query heads; tried once per device type)."""
    repeat = q.shape[1] // k.shape[1]
    native = repeat == 1 or _flash_gqa.get(q.device.type, True)
    if not native:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    try:
        if q.device.type == "cuda":
            r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
            out, lse, state = r[0], r[1], r[2:8]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
            state = None
    except RuntimeError:
        if not native or repeat == 1 or q.device.type in _flash_gqa:
            raise
        _flash_gqa[q.device.type] = False
        return _flash_forward(q, k, v, scale)
    if repeat > 1:
        _flash_gqa[q.device.type] = native
    return out, lse, state, not native


@contextlib.contextmanager
def _deterministic_algorithms():
    """aten's flash backward sums dQ over key blocks with atomic adds, so its gradients need not repeat bit for
    bit, unless deterministic algorithms are on: then it sums in a fixed order. They are turned on around that
    one call, so that the sdpa form's losses repeat like flex's (what `scripts/bench_train.py --repeat`
    checks), and the caller's setting comes back after it."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if was and not warn_only:
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _flash_backward(grad_out, q, k, v, out, lse, scale, state, repeated):
    """dq, dk, dv of `_flash_forward`, with dk, dv at k's head count, in a fixed order of sums."""
    hk = k.shape[1]
    g = q.shape[1] // hk
    if repeated:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if q.device.type == "cuda":
        cum_q, cum_k, max_q, max_k, seed, offset = state
        with _deterministic_algorithms():
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale)
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, True, scale=scale)
    if repeated:
        b, _, t, d = dk.shape
        dk, dv = dk.reshape(b, hk, g, t, d).sum(2), dv.reshape(b, hk, g, t, d).sum(2)
    return dq, dk, dv


class _CausalPlusDiagonal(torch.autograd.Function):
    """TTT attention as causal flash attention over the step-0 keys, merged with the k diagonal scores of steps
    1..k through the log-sum-exps. Backward runs flash's backward with the merged output and log-sum-exp in
    place of the causal part's own: its probabilities exp(s - lse) are then the merged softmax's, and its row
    term sum(dO * O) the merged one, so dq, dK0 and dV0 are exact (how ring attention joins key blocks). The
    diagonal's gradients are row-wise products. q [B, Hq, T, D]; k0, v0 [B, Hk, T, D]; kd, vd [B, Hk, k, T, D]."""

    @staticmethod
    def forward(ctx, q, k0, v0, kd, vd, scale):
        with torch.autocast(q.device.type, enabled=False):
            out, lse, state, repeated = _flash_forward(q, k0, v0, scale)
            if kd.shape[2]:
                out, lse = merge_diagonal(q, kd, vd, out, lse, scale)
        ctx.save_for_backward(q, k0, v0, kd, vd, out, lse)
        # flash's varlen offsets, max lengths (ints) and RNG state: small, and not all tensors
        ctx.scale, ctx.state, ctx.repeated = scale, state, repeated
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k0, v0, kd, vd, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.contiguous()
            dq, dk0, dv0 = _flash_backward(grad_out, q, k0, v0, out, lse, ctx.scale, ctx.state, ctx.repeated)
            if not kd.shape[2]:
                return dq, dk0, dv0, torch.zeros_like(kd), torch.zeros_like(vd), None
            dq, dk, dv = diagonal_backward(q, kd, vd, out, lse, grad_out, dq, ctx.scale)
        return dq, dk0, dv0, dk, dv, None


def ttt_attention_sdpa(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                       doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same result as `ttt_attention_reference`: causal flash attention (aten's, CUDA or CPU) over the step-0
    keys, merged with the diagonal keys of the later steps (`_CausalPlusDiagonal`). Unpacked rows only. Under
    autocast all take the autocast dtype, as in `ttt_attention_flex`. On CUDA its backward is FlashAttention-2's
    in its deterministic mode (`_deterministic_algorithms`), so losses repeat bit for bit."""
    if doc_ids is not None:
        raise ValueError("TTT attention 'sdpa' has no packed rows (doc_ids); use 'flex' or 'reference'")
    dtype = q.dtype
    if torch.is_autocast_enabled(q.device.type) and q.dtype in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.get_autocast_dtype(q.device.type)
    q = q.to(dtype)
    k0, v0 = keys[0].to(dtype), values[0].to(dtype)
    b, hk, t, d = k0.shape
    if len(keys) > 1:
        kd = torch.stack([k.to(dtype) for k in keys[1:]], dim=2)
        vd = torch.stack([v.to(dtype) for v in values[1:]], dim=2)
    else:
        kd = vd = k0.new_zeros(b, hk, 0, t, d)
    return _CausalPlusDiagonal.apply(q, k0, v0, kd, vd, d ** -0.5)


IMPLS = ("auto", "flex", "reference", "sdpa")
# "auto" takes sdpa for query widths (heads x head size) from this on. On an H100 (docs/benchmarks.md,
# 2026-12-06) the sdpa form made the 8B shape's step (32 x 128) about 2% faster and the 135M default's (9 x 64)
# 15-30% slower: the attention's GPU time halved there too, but that step waits on the host (its GPU is busy
# for some 30 of about 170 ms) and the sdpa form launches more kernels. Widths in between are unmeasured.
SDPA_MIN_WIDTH = 2048


def ttt_attention(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                  impl: str = "auto", doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TTT attention of step len(keys)-1. impl: "flex", "reference", "sdpa", or "auto": on CUDA "sdpa" for
    wide queries (`SDPA_MIN_WIDTH`), "flex" for narrow ones, for packed rows (sdpa has no document mask) and
    under deterministic algorithms (whose figures stay those of flex); "reference" elsewhere (flex has no fused
    CPU training kernel). `doc_ids` [B, T]: packed rows, whose conversations do not see each other."""
    if impl == "auto":
        if q.device.type != "cuda":
            impl = "reference"
        elif (doc_ids is None and not torch.are_deterministic_algorithms_enabled()
              and q.shape[1] * q.shape[-1] >= SDPA_MIN_WIDTH):
            impl = "sdpa"
        else:
            impl = "flex"
    if impl == "flex":
        return ttt_attention_flex(q, keys, values, doc_ids)
    if impl == "reference":
        return ttt_attention_reference(q, keys, values, doc_ids)
    if impl == "sdpa":
        return ttt_attention_sdpa(q, keys, values, doc_ids)
    raise ValueError(f"unknown TTT attention impl {impl!r}; one of {IMPLS}")
