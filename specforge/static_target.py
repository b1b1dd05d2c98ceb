"""The target's forward over a static KV cache, for decoding (plain and speculative alike).

It reads the HF model's own modules (norms, projections, MLP or experts, rope frequencies) and replaces only
the attention bookkeeping: keys and values go to fixed slots of a preallocated cache, and every query gets
an explicit boolean mask over slots. That one mechanism serves a decode step (1 token), a chain verify
(S+1 tokens, causal) and a tree verify (ancestor mask). Shapes stay static, so CUDA graphs can replay it.

Layers that see only part of the past (a sliding window: Mistral, some Qwen layers; chunks: Llama 4) narrow
the caller's mask by the tokens' positions, which the cache keeps per slot (in a tree, slot is not position)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import skinny_linear
from .layers import SlotMask, apply_rope, cache_mask, dense_slots, grouped_attention, rope_angles, rope_cos_sin
from .targets import decoder_model, decoder_parts, text_config

# Families whose layer is pre-norm attention with q/k/v/o projections, then an MLP or a sparse block called on
# [B, S, H]. Llama 4 adds its own rotation (adjacent channel pairs), L2 q/k norms, chunked attention on rope
# layers, and a query temperature on the layers without rope.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "llama4_text")
# Whether `compile()` compiles the forward's prologue too; off: on an H100 (2026-12-05) it cut the SmolLM2 step by
# 0-4%, within run-to-run spread, and its GPU tests have not run with it alone (bench_decode.py --compile-prologue).
COMPILE_PROLOGUE = False
# Activation modules that compute silu(x) (torch's and HF's): a gated MLP with one of them can take
# `skinny_linear.glu_linear` (GLU_EPILOGUE).
SILUS = ("SiLU", "SiLUActivation")


def layer_spans(cfg) -> list[tuple[str, Optional[int]]]:
    """Per layer: ("full", None), ("window", W) (a key at most W-1 positions back) or ("chunk", C) (the query's
    own chunk of C positions), as HF's masks for the config have it."""
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    out = []
    for kind in kinds:
        if kind == "chunked_attention":
            out.append(("chunk", cfg.attention_chunk_size))
        elif window is not None and (kind == "sliding_attention" or cfg.model_type == "mistral"):
            out.append(("window", window))
        else:
            out.append(("full", None))
    return out


def rope_pairs(x, cos, sin):
    """Llama 4's rotation of adjacent channel pairs (HF applies it as a complex product in float32); x is
    [B, S, H, D], cos and sin [B, S, 1, D/2] in the precision to rotate in."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def _local_rows(weight) -> int:
    return (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, Optional[torch.Tensor], list[int]]:
    """One weight (and bias) for linears that read the same input, so that a step runs one matmul instead of
    several. The modules' parameters become views of it: no extra memory, values unchanged, and the HF module
    still computes what it did. Returns (weight, bias or None, output widths)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = [m.bias is not None for m in linears]
    bias = None
    if any(has_bias):
        bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                          for m in linears])
    widths, start = [], 0
    for i, m in enumerate(linears):
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        if has_bias[i]:
            m.bias = nn.Parameter(bias[start:start + rows], requires_grad=False)
        widths.append(rows)
        start += rows
    return weight, bias, widths


def is_sparse_block(ff: nn.Module) -> bool:
    """Qwen3-MoE's sparse block in transformers 5's layout: a router (`gate`) and experts stored as 3-D
    tensors (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    e = getattr(ff, "experts", None)
    return (hasattr(ff, "gate") and e is not None and getattr(e, "gate_up_proj", None) is not None
            and e.gate_up_proj.dim() == 3 and getattr(e, "down_proj", None) is not None and e.down_proj.dim() == 3
            and e.gate_up_proj.shape[1] == 2 * e.down_proj.shape[2])


def sparse_moe(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Qwen3-MoE sparse block's output, computed without data-dependent shapes or host reads, so that a CUDA
    graph can capture it: each token's top-k experts' weights are gathered and applied with batched matmuls
    (HF's eager path loops over the experts hit, which needs the host). Same routing and weighting as HF."""
    b, s, h = x.shape
    flat = x.reshape(-1, h)
    routed = block.gate(flat)
    if isinstance(routed, tuple):  # (router logits, top-k weights, top-k indices)
        weights, idx = routed[1], routed[2]
    else:  # a router that returns logits only
        probs = torch.softmax(routed.float(), dim=-1)
        weights, idx = probs.topk(block.top_k, dim=-1)
        if getattr(block, "norm_topk_prob", False):
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(routed.dtype)
    e = block.experts
    n, k = idx.shape
    which = idx.reshape(-1)
    rows = flat[:, None].expand(n, k, h).reshape(n * k, h, 1)
    gate, up = torch.bmm(e.gate_up_proj.index_select(0, which), rows)[..., 0].chunk(2, dim=-1)
    act = (e.act_fn(gate) * up)[..., None]
    out = torch.bmm(e.down_proj.index_select(0, which), act)[..., 0].view(n, k, h)
    return (out * weights[..., None].to(out.dtype)).sum(1).to(x.dtype).view(b, s, h)


# RMSNorms whose forward is x * rsqrt(mean(x^2) + eps) in float32, rounded to x's dtype, times the weight:
# HF's norms of the supported families, and ours. `skinny_linear.add_norm_linear` computes exactly that.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm",
             "Llama4TextRMSNorm", "RMSNorm")


def rms_norm_eps(norm: nn.Module) -> Optional[float]:
    """The epsilon of a norm `add_norm_linear` can stand in for (`RMS_NORMS`), else None."""
    if type(norm).__name__ not in RMS_NORMS or getattr(norm, "weight", None) is None:
        return None
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def is_gated_mlp(ff: nn.Module) -> bool:
    """A SwiGLU-style MLP: down(act(gate(x)) * up(x)) (HF names the activation act_fn, or activation_fn)."""
    return all(isinstance(getattr(ff, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) \
        and (hasattr(ff, "act_fn") or hasattr(ff, "activation_fn"))


def is_silu_mlp(ff: nn.Module) -> bool:
    """A gated MLP whose activation is SiLU (`SILUS`): `skinny_linear.glu_linear` computes it."""
    return is_gated_mlp(ff) and type(getattr(ff, "act_fn", None) or ff.activation_fn).__name__ in SILUS


def interleave_linears(gate: nn.Linear, up: nn.Linear) -> tuple[torch.Tensor, Optional[torch.Tensor], None]:
    """One weight (and bias) for a gated MLP's gate and up projections with their rows interleaved (gate 0, up 0,
    gate 1, ...; `skinny_linear.interleave_rows`), the layout `glu_linear` reads. The modules' parameters become
    strided views of it (no extra memory; the HF module still computes what it did). Returns (weight, bias or
    None, None): the None in place of `fuse_linears`' widths marks the layout."""
    weight = skinny_linear.interleave_rows(gate.weight.detach(), up.weight.detach())
    bias = None
    if gate.bias is not None or up.bias is not None:
        zeros = gate.weight.new_zeros(gate.weight.shape[0])
        bias = skinny_linear.interleave_rows(zeros if gate.bias is None else gate.bias.detach(),
                                             zeros if up.bias is None else up.bias.detach())
    for half, m in enumerate((gate, up)):
        m.weight = nn.Parameter(weight[half::2], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(bias[half::2], requires_grad=False)
    return weight, bias, None


class StaticTarget(nn.Module):
    """`fuse=True` (not under tensor parallelism) joins each layer's q/k/v projections, and the gate and up
    projections of dense MLPs, into one matmul each (`fuse_linears`: the HF parameters become views).
    `skinny=True` (not under tensor parallelism) runs the layers' projections through `skinny_linear`, whose
    kernel reads a weight faster than cuBLAS at the few rows of a decode step or a verify; with
    `skinny_linear.FUSE_NORM`, where it serves, the residual add and the RMSNorm before the fused q/k/v and
    gate/up projections and before the head join that launch (`add_norm_linear`: two kernels fewer per layer);
    with `skinny_linear.GLU_EPILOGUE` when the target is built, a SiLU-gated MLP's gate and up rows are
    interleaved and its silu(gate) * up joins the gate/up projection's launch (`glu_linear`: one kernel fewer;
    that projection's add and norm then stay op by op, outside FUSE_NORM's launch)."""

    def __init__(self, model: nn.Module, aux_layer_ids: list[int], max_len: int, batch: int = 1,
                 fuse: bool = True, skinny: bool = True):
        super().__init__()
        cfg = text_config(model.config)
        if cfg.model_type not in FAMILIES:
            raise SystemExit(f"bench: the static-cache decoder runs {', '.join(FAMILIES)} targets; "
                             f"{cfg.model_type!r} is not supported by it yet")
        self.model = model
        embed, layers, norm, lm_head = decoder_parts(model)
        self.embed_tokens, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.aux_layer_ids = list(aux_layer_ids)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # This process's heads: all of them, or its share of a tensor-parallel target (whose projections
        # return local heads, and whose o_proj sums the shares).
        attn = layers[0].self_attn
        self.num_heads = _local_rows(attn.q_proj.weight) // self.head_dim
        self.num_kv_heads = _local_rows(attn.k_proj.weight) // self.head_dim
        self.rotary = decoder_model(model).rotary_emb
        self.llama4 = cfg.model_type == "llama4_text"
        # Query temperature of Llama 4's layers without rope: (floor_scale, attn_scale), or None.
        self.temperature = (cfg.floor_scale, cfg.attn_scale) if getattr(cfg, "attn_temperature_tuning", False) \
            else None
        # Spans that a cache of max_len slots can exceed; the others are plain causal attention here.
        self.spans = [(k, n) if k != "full" and n < max_len else ("full", None) for k, n in layer_spans(cfg)]
        self.spans_full = all(k == "full" for k, _ in self.spans)
        self.max_len = max_len
        w = embed.weight
        shape = (len(layers), batch, self.num_kv_heads, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=w.dtype, device=w.device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=w.dtype, device=w.device), persistent=False)
        # The position of the token in each row's slot (read only by windowed and chunked layers); per row, as
        # the rows of a left-padded batch count positions from their own first token.
        self.register_buffer("slot_positions", torch.zeros(batch, max_len, dtype=torch.long, device=w.device),
                             persistent=False)
        # Per layer: the fused q/k/v and gate/up weights, or None where the HF modules are called.
        split = hasattr(attn.q_proj.weight, "to_local")  # tensor parallel: the shards stay as they are
        self.qkv = [fuse_linears([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj])
                    if fuse and not split else None for l in layers]
        self.skinny = skinny and not split
        glu = self.skinny and skinny_linear.GLU_EPILOGUE
        self.gate_up = [None if not (fuse and not split and is_gated_mlp(f)) else
                        interleave_linears(f.gate_proj, f.up_proj) if glu and is_silu_mlp(f) else
                        fuse_linears([f.gate_proj, f.up_proj]) for f in (self._ff(l) for l in layers)]
        # Whether a CUDA graph can capture the forward: every feed-forward is dense, Llama 4's (dense over its
        # experts), or a sparse block `sparse_moe` runs; other sparse blocks route through the host.
        self.capturable = all(self.llama4 or is_gated_mlp(f) or is_sparse_block(f)
                              for f in (self._ff(l) for l in layers))
        self._layer_fn, self._head_fn, self._prologue_fn = self._layer, self._head, self._prologue
        self._compiled = False

    def _ff(self, layer: nn.Module) -> nn.Module:
        return layer.feed_forward if self.llama4 else layer.mlp

    def _masks(self, mask, positions: torch.Tensor) -> tuple[dict, int]:
        """The per-forward form of the mask for each kind of layer span present, and the cache slots the
        attention reads. A SlotMask stays as it is for `cache_attention` where every layer sees the whole past
        (windows and chunks read the positions per slot, so they take it dense)."""
        groups = self.num_heads // self.num_kv_heads
        if isinstance(mask, SlotMask):
            span = min(mask.span, self.max_len)
            if self.spans_full:
                return {("full", None): cache_mask(mask, groups, span)}, span
            mask = dense_slots(mask, span)
        span = mask.shape[-1]
        slot_positions = self.slot_positions[:, None, :span]
        out = {}
        for kind, n in dict.fromkeys(self.spans):
            m = mask
            if kind == "window":
                m = mask & (positions[:, :, None] - slot_positions < n)
            elif kind == "chunk":
                m = mask & (positions[:, :, None] // n == slot_positions // n)
            out[(kind, n)] = cache_mask(m, groups)
        return out, span

    def compile(self) -> None:
        """torch.compile the prologue, the layer and the head (regional: every layer of a kind reuses one compiled
        graph, so compiling takes seconds, not minutes); token counts are dynamic (one graph for 1 token, one
        for more).
        The loop over layers stays Python, which a CUDA graph of the forward does not replay."""
        if self._compiled:
            return
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._layer_fn = torch.compile(self._layer, dynamic=True)
        self._head_fn = torch.compile(self._head, dynamic=True)
        if COMPILE_PROLOGUE:
            self._prologue_fn = torch.compile(self._prologue, dynamic=True)
        self._compiled = True

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask, eager: bool = False,
                logit_rows: Optional[torch.Tensor] = None, features: bool = True):
        """tokens, positions [B, S]; slots [S] cache slots to write; mask [B, S, L] over the first L <= max_len
        slots, which are all the attention reads (True = attend, the new tokens' own slots included), or a
        SlotMask (batch 1). `eager`: the uncompiled layers even after `compile()`. `logit_rows` [R]: the only
        rows whose logits are computed (a prompt needs its last row's; the head over all is the bulk of its
        memory). `features=False`: no aux (plain decoding and generation never read them; their concatenation
        is a kernel of its own). Returns (logits [B, S or R, V], aux [B, S, 3H] or None)."""
        h, cos, sin, q_scale = (self._prologue if eager else self._prologue_fn)(tokens, positions, slots)
        masks, span = self._masks(mask, positions)  # span: the cache slots the attention reads
        aux, delta = {}, None
        for i, layer in enumerate(self.layers):
            h, h_in, delta = (self._layer if eager else self._layer_fn)(
                layer, h, delta, cos, sin, q_scale, slots, masks[self.spans[i]], self.k_cache[i][:, :, :span],
                self.v_cache[i][:, :, :span], self.qkv[i], self.gate_up[i])
            if features and i in self.aux_layer_ids:
                aux[i] = h_in
        if logit_rows is not None:
            h, delta = h.index_select(1, logit_rows), delta.index_select(1, logit_rows)
        logits = (self._head if eager else self._head_fn)(h, delta)
        return logits, torch.cat([aux[j] for j in self.aux_layer_ids], dim=-1) if features else None

    def _prologue(self, tokens, positions, slots):
        """The embedding, the positions of the slots written, the rope angles and Llama 4's query temperature:
        one compiled region (nine eager launches per forward otherwise, inside every step's graph)."""
        h = self.embed_tokens(tokens)
        self.slot_positions.index_copy_(1, slots, positions)
        q_scale = None
        if self.llama4:  # angles per channel pair, kept in float32 (float64 for a float64 model)
            cos, sin = (t[:, :, None] for t in rope_angles(self.rotary, h, positions))  # [B, S, 1, D/2]
            if self.temperature is not None:
                floor_scale, attn_scale = self.temperature
                q_scale = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
        else:
            cos, sin = rope_cos_sin(self.rotary, h, positions)
        return h, cos, sin, q_scale

    def _head(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        eps = self._fused_eps(self.norm, h, head.weight) if type(head) is nn.Linear else None
        if eps is not None:
            return skinny_linear.add_norm_linear(h, delta, self.norm.weight, eps, head.weight, head.bias)[0]
        return head(self.norm(h + delta))

    def _fused_eps(self, norm: nn.Module, h: torch.Tensor, weight: torch.Tensor) -> Optional[float]:
        """The norm's epsilon where `add_norm_linear`'s kernel stands in for norm(h + ...) projected by
        `weight`, else None."""
        eps = rms_norm_eps(norm) if self.skinny else None
        if eps is None or norm.weight.dtype != h.dtype or not skinny_linear.norm_serves(h, weight):
            return None
        return eps

    def _norm_linear(self, norm: nn.Module, h, delta, weight, bias):
        """(the projection of norm(h + delta), h + delta); delta None: h alone. One `add_norm_linear` launch
        where its kernel serves this norm and these rows, else op by op as the HF modules compute it."""
        eps = self._fused_eps(norm, h, weight)
        if eps is not None:
            return skinny_linear.add_norm_linear(h, delta, norm.weight, eps, weight, bias)
        if delta is not None:
            h = h + delta
        return self._linear(norm(h), weight, bias), h

    def _layer(self, layer, h, delta, cos, sin, q_scale, slots, mask, k_cache, v_cache, qkv, gate_up):
        """One decoder layer over the static cache (`k_cache`, `v_cache`: this layer's first L slots, [B, Hkv, L, D]);
        `qkv`, `gate_up`: the fused weights of `fuse_linears`, or None. The residual add of the previous layer's
        feed-forward output `delta` (None for the first layer) happens here, with this layer's input norm (in the
        q/k/v projection's launch, or fused by the compiler), instead of as a kernel of its own at the end of
        that layer. Returns
        (residual after attention, this layer's input = h + delta, feed-forward output)."""
        b, s, _ = h.shape
        a = layer.self_attn
        if qkv is not None:
            qkv_out, h = self._norm_linear(layer.input_layernorm, h, delta, qkv[0], qkv[1])
            q, k, v = qkv_out.split(qkv[2], dim=-1)
        else:
            if delta is not None:
                h = h + delta
            x = layer.input_layernorm(h)
            q, k, v = self._proj(a.q_proj, x), self._proj(a.k_proj, x), self._proj(a.v_proj, x)
        h_in = h
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        if self.llama4:  # rotation (rope layers), then L2 norms; or the query temperature (no-rope layers)
            if a.use_rope:
                q, k = rope_pairs(q, cos, sin), rope_pairs(k, cos, sin)
            if hasattr(a, "qk_norm"):
                q, k = a.qk_norm(q), a.qk_norm(k)
            if q_scale is not None and not a.use_rope:
                q = (q * q_scale[:, :, None, None]).to(q.dtype)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            if hasattr(a, "q_norm"):  # Qwen3: per-head RMSNorm before rope
                q, k = a.q_norm(q), a.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache.index_copy_(2, slots, k)
        v_cache.index_copy_(2, slots, v)
        o = grouped_attention(q, k_cache, v_cache, mask)
        o = self._proj(a.o_proj, o.transpose(1, 2).reshape(b, s, -1))
        ff = self._ff(layer)
        if gate_up is not None:
            if gate_up[2] is None:  # interleaved (GLU_EPILOGUE): silu(gate) * up in the projection's launch
                h = h + o
                act = skinny_linear.glu_linear(layer.post_attention_layernorm(h), gate_up[0], gate_up[1])
                return h, h_in, self._proj(ff.down_proj, act)
            gate_up_out, h = self._norm_linear(layer.post_attention_layernorm, h, o, gate_up[0], gate_up[1])
            act = getattr(ff, "act_fn", None) or ff.activation_fn
            gate, up = gate_up_out.chunk(2, dim=-1)
            return h, h_in, self._proj(ff.down_proj, act(gate) * up)
        h = h + o
        return h, h_in, self._feed_forward(ff, layer.post_attention_layernorm(h))

    def _linear(self, x, weight, bias):
        return skinny_linear.linear(x, weight, bias) if self.skinny else F.linear(x, weight, bias)

    def _proj(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A projection module on x, through `_linear` where it is a plain nn.Linear."""
        if self.skinny and type(module) is nn.Linear:
            return skinny_linear.linear(x, module.weight, module.bias)
        return module(x)

    def _feed_forward(self, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A feed-forward without fused gate/up weights: Qwen3-MoE's sparse block, or the HF module."""
        if is_sparse_block(ff):
            return sparse_moe(ff, x)
        out = ff(x)
        return (out[0] if isinstance(out, tuple) else out).view(x.shape)  # Llama 4's blocks add router logits

    @torch.no_grad()
    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Keep the accepted path: copy cache entries at slots `src` to slots `dst` (rollback of the rest is
        implicit: slots past the new length are masked out and overwritten later)."""
        self.k_cache.index_copy_(3, dst, self.k_cache.index_select(3, src))
        self.v_cache.index_copy_(3, dst, self.v_cache.index_select(3, src))
        self.slot_positions.index_copy_(1, dst, self.slot_positions.index_select(1, src))
