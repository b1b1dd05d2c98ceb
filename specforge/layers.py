"""Building blocks that the target-side code and the draft share: RMSNorm, rotary embeddings, and attention
over a KV cache under a boolean mask. They sit below both (the static-cache target and the offline target
head read them as the draft does), so neither has to import the other."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import batch_invariant, cache_attention
from .kernels.invariant_attention import attention as invariant_attention
from .kernels.invariant_attention import key_order


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype `t`'s values travel in: autocast's where `t` is float32 and autocast is on for its device (the
    tensors autocast casts for a projection), else `t`'s own. Training keeps float32 weights under bf16
    autocast: a norm's float32 weight would make its output float32, which each projection reading it casts
    again (and whose gradient each casts back), though the projections see the same bf16 values."""
    kind = t.device.type
    if t.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


class RMSNorm(nn.Module):
    """Llama's RMSNorm (statistics in at least float32, as HF does), which keeps float64 exact for tests. Under
    autocast it returns autocast's dtype (`autocast_dtype`)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        out = self.formula(x)
        return out.to(autocast_dtype(out))

    def formula(self, x):
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


batch_invariant.register_norm_class(RMSNorm, "formula")  # the deterministic switch swaps the formula


def rope_angles(rotary, like: torch.Tensor, positions: torch.Tensor):
    """cos and sin [..., D/2] of the rope angles of `positions`, times the rotary's attention scaling.
    Frequencies come from HF's rope init (`rotary`, an HF rotary embedding module, so every rope scaling type
    of the target works); computed in float64 for float64 inputs (`like`), else float32, and left so."""
    dt = torch.float64 if like.dtype == torch.float64 else torch.float32
    freqs = positions[..., None].to(dt) * rotary.inv_freq.to(dt)
    scale = rotary.attention_scaling
    return freqs.cos() * scale, freqs.sin() * scale


def rope_cos_sin(rotary, like: torch.Tensor, positions: torch.Tensor):
    """cos/sin [..., D] for `apply_rope` (both halves rotate by the same angles), in `like`'s dtype."""
    cos, sin = rope_angles(rotary, like, positions)
    return torch.cat([cos, cos], dim=-1).to(like.dtype), torch.cat([sin, sin], dim=-1).to(like.dtype)


def apply_rope(x, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def group_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """A boolean mask [B, S, L] repeated for the `groups` query heads that share a kv head: [B, 1, G*S, L]."""
    b, s, length = mask.shape
    return mask[:, None, None].expand(b, 1, groups, s, length).reshape(b, 1, groups * s, length)


class SlotMask(NamedTuple):
    """The cache slots each of S query rows reads, as every decoding forward has them: all slots before
    `prefix` ([1] int64 on the device) and, of the T slots from there, those `local` [S, T] bool marks.
    `span`: the slots a dense form of it covers (the caller's cache is cut to at most that many). The length
    never reaches the host, so on CUDA one captured graph serves every cache length (`cache_attention`)."""
    prefix: torch.Tensor
    local: torch.Tensor
    span: int


class CacheMask(NamedTuple):
    """A cache mask [B, S, L] (True = attend) with what the attention derives from it, made once per
    forward and read by every layer: the per-head rows for SDPA, or the key order of the batch-invariant
    kernel (on CUDA, under the deterministic switch); or, for `cache_attention`, the SlotMask itself."""
    mask: Optional[torch.Tensor]
    rows_mask: Optional[torch.Tensor]
    keys: Optional[tuple[torch.Tensor, torch.Tensor]]
    slots: Optional[SlotMask] = None


def slot_kernel_serves(device: torch.device, rows: int) -> bool:
    """Whether `cache_attention`'s kernel reads a SlotMask as it is, for `rows` query rows per kv head (query
    heads per kv head times queries) on `device`: CUDA, rows that fit one program, and not under the
    deterministic switch, whose kernel is another. Otherwise the mask is made dense."""
    return not batch_invariant.active() and cache_attention.serves(device, rows)


def dense_slots(mask: SlotMask, length: int) -> torch.Tensor:
    """[1, S, length] boolean form of a SlotMask over the first `length` cache slots."""
    return cache_attention.dense_mask(mask.prefix, mask.local, length)[None]


def cache_mask(mask, groups: int, length: Optional[int] = None) -> CacheMask:
    """`mask`: [B, S, L] bool, or a SlotMask (read over `length` slots where it must be made dense)."""
    if isinstance(mask, SlotMask):
        if slot_kernel_serves(mask.local.device, groups * mask.local.shape[0]):
            return CacheMask(None, None, None, mask)
        mask = dense_slots(mask, min(mask.span, length or mask.span))
    if batch_invariant.active():
        return CacheMask(mask, None, key_order(mask) if mask.is_cuda else None)
    return CacheMask(mask, group_mask(mask, groups), None)


def grouped_attention(q, k, v, m: CacheMask):
    """Attention of q [B, Hq, S, D] over a KV cache k, v [B, Hkv, L, D] under `cache_mask(mask, Hq/Hkv)`.
    Query heads sharing a kv head are folded into the row dimension, so no repeated K/V and no GQA special
    case: one plain attention with Hkv heads and Hq/Hkv*S rows. Under the deterministic switch, the
    batch-invariant kernel instead; for a SlotMask on CUDA, `cache_attention`."""
    if m.slots is not None:
        return cache_attention.cache_attention(q, k, v, m.slots.prefix, m.slots.local)
    if m.rows_mask is None:
        return invariant_attention(q, k, v, m.mask, keys=m.keys)
    b, hq, s, d = q.shape
    hk = k.shape[1]
    q = q.reshape(b, hk, hq // hk * s, d)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] <= 8:
        # Decode-shaped queries in bf16 on the CPU (batched generation): plain attention is about twice as
        # fast as SDPA's flash kernel there, once a cache slice is made contiguous (bf16 matmuls over a
        # strided batch take a slow path).
        k, v = k.contiguous(), v.contiguous()
        w = (q @ k.transpose(-1, -2)).float().mul_(d ** -0.5).masked_fill_(~m.rows_mask, float("-inf"))
        return (w.softmax(-1).to(v.dtype) @ v).reshape(b, hq, s, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m.rows_mask).reshape(b, hq, s, d)
