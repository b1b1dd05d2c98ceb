"""Batch-invariant attention over a KV cache, with a fixed split size.

Each program serves one query token and all the query heads that share its kv head, over one fixed range of
SPLIT key positions; a second kernel merges the ranges in order. Nothing about a query token's arithmetic
depends on how many other tokens are in the call: a 1-token decode step and the same token inside a verify
pass (chain or tree) sum the same products in the same order.

Keys are taken in the order of their *positions*, not of their cache slots. A row's attended slots come as a
boolean mask over the cache; `key_order` lists them in slot order, and in both the chain and the tree layout
of the decoder slot order is position order (tree nodes are laid out depth by depth, so a node's ancestors
have increasing slots). The j-th key a row attends is thus its j-th position whether it sits in the prefix or
in a tree branch, so plain decoding and tree verification reduce over identical blocks.

`attention(q, k, v, mask)`: q [B, Hq, S, D], k/v [B, Hk, L, D], mask [B, S, L] bool (True = attend) or None
(causal: the S queries are the last S of L positions). Returns [B, Hq, S, D] in q's dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

SPLIT = 512  # key positions per split: fixed, whatever the number of queries or the cache length
BLOCK_N = 64  # key positions per step inside a split
BLOCK_G = 16  # query heads of one kv head, padded to the smallest tensor-core tile


def key_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of mask [B, S, L]: the attended slots in slot order (then the others), and their count.
    A stable sort: no host sync, so it runs inside a captured CUDA graph."""
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return order, mask.sum(-1, dtype=torch.int32)


def attention_reference(q, k, v, mask: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """Plain masked softmax attention in float32 (float64 stays float64), GQA by head grouping."""
    b, hq, s, d = q.shape
    hk, length = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    if mask is None:
        mask = torch.ones(s, length, dtype=torch.bool, device=q.device).tril(length - s)[None].expand(b, s, length)
    qg = q.to(acc).reshape(b, hk, hq // hk, s, d)
    scores = torch.einsum("bhgsd,bhld->bhgsl", qg, k.to(acc)) * scale
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that attend nothing: zeros
    out = torch.einsum("bhgsl,bhld->bhgsd", p, v.to(acc))
    return out.reshape(b, hq, s, d).to(q.dtype)


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, order_ptr, count_ptr, m_ptr, l_ptr, acc_ptr, scale,
                      S, L, HK, G, NSPLIT,
                      s_qb, s_qh, s_qs, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                      HAS_ORDER: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr,
                      SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        s = pid % S
        bh = pid // S
        hk = bh % HK
        b = bh // HK
        if HAS_ORDER:
            count = tl.load(count_ptr + b * S + s)
        else:
            count = L - S + s + 1  # causal: the queries are the last S positions
        g = tl.arange(0, BLOCK_G)
        dd = tl.arange(0, D)
        heads = hk * G + g
        q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + s * s_qs + dd[None, :], mask=g[:, None] < G,
                    other=0.0)
        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        lo = sp * SPLIT
        hi = tl.minimum(lo + SPLIT, count)
        for j0 in range(lo, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            valid = j < hi
            if HAS_ORDER:
                slot = tl.load(order_ptr + (b * S + s).to(tl.int64) * L + j, mask=valid, other=0)
            else:
                slot = j
            kt = tl.load(k_ptr + b * s_kb + hk * s_kh + slot[None, :].to(tl.int64) * s_kl + dd[:, None],
                         mask=valid[None, :], other=0.0)
            if IEEE:
                scores = tl.dot(q, kt, input_precision="ieee") * scale
            else:
                scores = tl.dot(q, kt) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - safe)
            p = tl.exp(scores - safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(v_ptr + b * s_vb + hk * s_vh + slot[:, None].to(tl.int64) * s_vl + dd[None, :],
                         mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        # partials [B, HQ, S, NSPLIT] (m, l) and [B, HQ, S, NSPLIT, D] (acc)
        row = ((b * HK * G + heads) * S + s) * NSPLIT + sp
        tl.store(m_ptr + row, m_i, mask=g < G)
        tl.store(l_ptr + row, l_i, mask=g < G)
        tl.store(acc_ptr + row[:, None] * D + dd[None, :], acc, mask=g[:, None] < G)

    @triton.jit
    def _merge_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, S, HQ, NSPLIT, s_ob, s_oh, s_os,
                      D: tl.constexpr, BLOCK_S: tl.constexpr):
        """One (batch, head, query): the splits' partial results merged in split order."""
        r = tl.program_id(0)
        s = r % S
        h = (r // S) % HQ
        b = r // (S * HQ)
        sp = tl.arange(0, BLOCK_S)
        ms = tl.load(m_ptr + r * NSPLIT + sp, mask=sp < NSPLIT, other=float("-inf"))
        big = tl.max(ms, axis=0)
        safe = tl.where(big == float("-inf"), 0.0, big)
        dd = tl.arange(0, D)
        total = 0.0
        out = tl.zeros((D,), tl.float32)
        for i in range(0, NSPLIT):
            w = tl.exp(tl.load(m_ptr + r * NSPLIT + i) - safe)
            total += w * tl.load(l_ptr + r * NSPLIT + i)
            out += w * tl.load(acc_ptr + (r * NSPLIT + i) * D + dd)
        out = tl.where(total > 0, out / total, 0.0)  # a row that attends nothing (padding) gives zeros
        tl.store(o_ptr + b * s_ob + h * s_oh + s * s_os + dd, out.to(o_ptr.dtype.element_ty))


def _triton_attention(q, k, v, mask, scale, keys):
    b, hq, s, d = q.shape
    hk, length = k.shape[1], k.shape[2]
    if hq // hk > BLOCK_G or d & (d - 1) or d < 16:
        raise ValueError(f"invariant attention: {hq // hk} query heads per kv head (at most {BLOCK_G}) and "
                         f"head dim {d} (a power of two, at least 16) are what the kernel serves")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if mask is not None:
        order, count = keys if keys is not None else key_order(mask)
    else:
        order = count = q  # unused
    nsplit = triton.cdiv(length, SPLIT)
    m = torch.empty(b, hq, s, nsplit, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    acc = torch.empty(b, hq, s, nsplit, d, dtype=torch.float32, device=q.device)
    _split_kernel[(b * hk * s, nsplit)](
        q, k, v, order, count, m, l_, acc, scale, s, length, hk, hq // hk, nsplit,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        HAS_ORDER=mask is not None, IEEE=q.dtype == torch.float32, D=d, SPLIT=SPLIT, BLOCK_N=BLOCK_N,
        BLOCK_G=BLOCK_G, num_warps=4, num_stages=2)
    out = torch.empty(b, hq, s, d, dtype=q.dtype, device=q.device)
    _merge_kernel[(b * hq * s,)](m, l_, acc, out, s, hq, nsplit, out.stride(0), out.stride(1), out.stride(2),
                                 D=d, BLOCK_S=triton.next_power_of_2(nsplit), num_warps=1)
    return out


def attention(q, k, v, mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              keys: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Batch-invariant attention on CUDA; the reference elsewhere (and for float64). Rows that attend
    nothing give zeros. `keys`: `key_order(mask)`, when the caller shares one across layers."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.is_cuda and triton is not None and q.dtype != torch.float64:
        return _triton_attention(q, k, v, mask, scale, keys)
    return attention_reference(q, k, v, mask, scale)
