"""The target's forward over a static KV cache, for decoding (plain and speculative alike).

It reads the HF model's own modules (norms, projections, MLP, rope frequencies) and replaces only the
attention bookkeeping: keys and values go to fixed slots of a preallocated cache, and every query gets
an explicit boolean mask over slots. That one mechanism serves a decode step (1 token), a chain verify
(S+1 tokens, causal) and a tree verify (ancestor mask). Shapes stay static, so CUDA graphs can replay it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..targets import decoder_model, decoder_parts, text_config
from .draft import apply_rope, cache_mask, grouped_attention

# Families whose decoder layer is the Llama layer (pre-norm attention with q/k/v/o projections, then an MLP
# called on [B, S, H]); Qwen3-MoE's sparse block is called like an MLP.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")


def sliding_window(cfg) -> Optional[int]:
    """The attention window of the layers that have one (None: every layer attends to the whole prefix)."""
    window = getattr(cfg, "sliding_window", None)
    windowed = "sliding_attention" in (getattr(cfg, "layer_types", None) or []) or cfg.model_type == "mistral"
    return window if windowed else None


class StaticTarget(nn.Module):
    def __init__(self, model: nn.Module, aux_layer_ids: list[int], max_len: int, batch: int = 1):
        super().__init__()
        cfg = text_config(model.config)
        if cfg.model_type not in FAMILIES:
            raise SystemExit(f"bench: the static-cache decoder runs Llama-layer targets ({', '.join(FAMILIES)}); "
                             f"{cfg.model_type!r} (chunked attention or another layer) is not supported by it yet")
        window = sliding_window(cfg)
        if window is not None and window < max_len:
            raise SystemExit(f"bench: the target attends through a sliding window of {window} tokens (config "
                             f"sliding_window), which the static-cache decoder does not apply; keep bench.max_len plus "
                             f"the tokens verified per round within {window}")
        self.model = model
        embed, layers, norm, lm_head = decoder_parts(model)
        self.embed_tokens, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.aux_layer_ids = list(aux_layer_ids)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rotary = decoder_model(model).rotary_emb
        self.max_len = max_len
        w = embed.weight
        shape = (len(layers), batch, self.num_kv_heads, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=w.dtype, device=w.device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=w.dtype, device=w.device), persistent=False)

    def rope(self, x, positions):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        freqs = positions[..., None].to(dt) * self.rotary.inv_freq.to(dt)
        emb = torch.cat([freqs, freqs], dim=-1)
        s = self.rotary.attention_scaling
        return (emb.cos() * s).to(x.dtype), (emb.sin() * s).to(x.dtype)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor):
        """tokens, positions [B, S]; slots [S] cache slots to write; mask [B, S, max_len] (True = attend,
        the new tokens' own slots included). Returns (logits [B, S, V], aux [B, S, 3H])."""
        b, s = tokens.shape
        h = self.embed_tokens(tokens)
        cos, sin = self.rope(h, positions)
        aux = {}
        shared_mask = cache_mask(mask, self.num_heads // self.num_kv_heads)
        for i, layer in enumerate(self.layers):
            if i in self.aux_layer_ids:
                aux[i] = h
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(b, s, -1, self.head_dim)
            k = a.k_proj(x).view(b, s, -1, self.head_dim)
            v = a.v_proj(x).view(b, s, -1, self.head_dim)
            if hasattr(a, "q_norm"):  # Qwen3: per-head RMSNorm before rope
                q, k = a.q_norm(q), a.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k_cache[i].index_copy_(2, slots, k)
            self.v_cache[i].index_copy_(2, slots, v)
            o = grouped_attention(q, self.k_cache[i], self.v_cache[i], shared_mask)
            h = h + a.o_proj(o.transpose(1, 2).reshape(b, s, -1))
            mlp = layer.mlp(layer.post_attention_layernorm(h))
            h = h + (mlp[0] if isinstance(mlp, tuple) else mlp)  # MoE blocks of some versions add router logits
        logits = self.lm_head(self.norm(h))
        return logits, torch.cat([aux[j] for j in self.aux_layer_ids], dim=-1)

    @torch.no_grad()
    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Keep the accepted path: copy cache entries at slots `src` to slots `dst` (rollback of the rest is
        implicit: slots past the new length are masked out and overwritten later)."""
        self.k_cache.index_copy_(3, dst, self.k_cache.index_select(3, src))
        self.v_cache.index_copy_(3, dst, self.v_cache.index_select(3, src))
