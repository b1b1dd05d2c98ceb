"""The EAGLE-3 draft head: one Llama decoder layer that reads [token embedding ; target features].

This is the only definition of the draft forward. Training (TTT, `ttt.py`) and decoding call the same
`layer`; they differ only in the attention function they pass in, which owns the keys and values."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRotaryEmbedding

from ..config import DraftConfig
from ..kernels import batch_invariant, skinny_linear
from ..layers import RMSNorm, apply_rope, autocast_dtype, rope_cos_sin
from . import grad_sums

# attend(q [B, heads, T, D], k, v [B, kv_heads, T, D]) -> [B, heads, T, D]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def draft_config(target_config, draft: DraftConfig, target_vocab: int, aux_layer_ids: list[int]) -> LlamaConfig:
    """The draft's Llama config: the target's widths, norms and rope, with the draft's own sizes. Besides
    Llama's fields it carries `draft_vocab_size`, the aux layers (HF hidden-state indices, ours), the EAGLE 3.1
    flags and the target's depth (which tells an export whether the layers are the engines' defaults)."""
    t = getattr(target_config, "text_config", None) or target_config
    heads = draft.num_attention_heads or t.num_attention_heads
    rope = dict(getattr(t, "rope_parameters", None) or {})
    if not rope:  # transformers 4.x configs
        rope = {"rope_type": "default", "rope_theta": getattr(t, "rope_theta", 10000.0)}
        if getattr(t, "rope_scaling", None):
            rope.update(t.rope_scaling)
            rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    cfg = LlamaConfig(
        hidden_size=t.hidden_size,
        intermediate_size=draft.intermediate_size or t.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=draft.num_key_value_heads or t.num_key_value_heads,
        head_dim=draft.head_dim or getattr(t, "head_dim", None) or t.hidden_size // heads,
        num_hidden_layers=1,
        vocab_size=target_vocab,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters=rope,
        hidden_act="silu",
        tie_word_embeddings=False,
    )
    cfg.draft_vocab_size = min(draft.draft_vocab_size, target_vocab)
    cfg.eagle_aux_hidden_state_layer_ids = list(aux_layer_ids)
    cfg.fc_norm, cfg.norm_output = draft.fc_norm, draft.norm_output
    cfg.num_target_layers = t.num_hidden_layers
    return cfg


class DraftAttention(nn.Module):
    """q/k/v read width 2H (embedding half and hidden half); the score pattern is the caller's."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(2 * h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def qkv(self, x, cos, sin):
        return self.heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin)

    def heads(self, q, k, v, cos, sin):
        """Projected q, k, v [B, T, heads * D] to [B, heads, T, D], q and k rotated."""
        b, t, _ = q.shape
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    @staticmethod
    def merge(o):
        """[B, heads, T, D] -> [B, T, heads * D], what o_proj reads."""
        b, _, t, _ = o.shape
        return o.transpose(1, 2).reshape(b, t, -1)

    def out(self, o):
        return self.o_proj(self.merge(o))


class DecodeWeights(NamedTuple):
    """The draft's projections laid out for decoding (`Eagle3Draft.decode_weights`): q/k/v as one weight and
    gate/up as one (copies; the parameters stay as they are), so a draft step launches five matmuls instead of
    eight, each through `skinny_linear` (a few rows spread over every SM, as the target's projections are)."""
    qkv: torch.Tensor
    widths: tuple[int, int, int]
    gate_up: torch.Tensor


class UnrollWeights(NamedTuple):
    """The layer's projections for one TTT unroll (`Eagle3Draft.unroll_weights`): q/k/v as one matrix and gate/up
    as one, in the dtype the matmuls run in, made once per batch from the parameters (autograd carries their
    gradients back through the cast and the concatenation). Every step reads these same tensors, so:
    - each step casts no weight (autocast's cast cache does not reach into torch.compile'd halves, which cast
      every weight at every step and then summed seven float32 gradients per weight in backward);
    - a step runs four matmuls instead of seven forward and eight instead of fourteen backward, and sums three
      fewer input gradients (q, k and v each gave their input one; gate and up too).
    `sums`: the four matrices come from `grad_sums.sunk`, and the steps' matmuls sum their weight gradients in
    place (`grad_sums`)."""
    qkv: torch.Tensor
    widths: tuple[int, int, int]
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    sums: bool = False

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return grad_sums.linear(x, w) if self.sums else F.linear(x, w)


class DraftLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.mlp = LlamaMLP(cfg)


class Eagle3Draft(nn.Module):
    """Parameter names are those of the serving checkpoint (see docs: fc, midlayer.*, norm, lm_head)."""

    def __init__(self, cfg: LlamaConfig, embed_tokens: Optional[nn.Embedding] = None):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(3 * h, h, bias=False)
        # EAGLE 3.1 (config.fc_norm): one RMSNorm per aux chunk, before `fc`; named fc_norm.{0,1,2} as the
        # speculators and SpecForge models name them. Absent otherwise, so EAGLE-3 checkpoints are unchanged.
        if getattr(cfg, "fc_norm", False):
            self.fc_norm = nn.ModuleList(RMSNorm(h, eps=cfg.rms_norm_eps) for _ in range(3))
        else:
            self.fc_norm = None
        self.norm_output = bool(getattr(cfg, "norm_output", False))
        self.midlayer = DraftLayer(cfg)
        self.norm = RMSNorm(h, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(cfg)
        # Identity mapping until a vocab is set (draft id i -> target id i).
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[: cfg.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        self.checkpointing = False  # activation checkpointing of the layer in training (train.grad_checkpoint)
        # The target's embedding, shared and frozen: kept out of parameters(), state_dict() and the optimizer.
        self._embed = (embed_tokens,)

    @property
    def embed_tokens(self) -> nn.Embedding:
        if self._embed[0] is None:
            raise RuntimeError("the draft has no token embedding: pass the target's embed_tokens")
        return self._embed[0]

    def set_embed_tokens(self, embed: nn.Embedding) -> None:
        embed.requires_grad_(False)
        self._embed = (embed,)

    def set_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def forward(self, fn: Callable, *args, **kwargs):
        """`fn(self, *args, **kwargs)`: training calls `draft(ttt_loss, ...)` so that a wrapper hooking the
        forward (FSDP: gather the weights, then reduce the gradients) sees the whole TTT step as one call."""
        return fn(self, *args, **kwargs)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def target_ids(self) -> torch.Tensor:
        """The target vocab id of every draft id, in draft-id order, on d2t's device (the lm_head rows the
        draft's own head takes from the target's, and what the decoder maps its picks through)."""
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The target's embeddings in the dtype the draft computes in (autocast's, where on)."""
        return self.embed_tokens(token_ids).to(autocast_dtype(self.fc.weight))

    def project(self, aux: torch.Tensor, w: Optional[DecodeWeights] = None) -> torch.Tensor:
        """Step 0's hidden state from the target's features [.., 3H]: fc (the features in the dtype the draft
        computes in), after a norm per aux chunk with fc_norm (EAGLE 3.1). `w`: decoding's layout
        (`decode_weights`)."""
        aux = aux.to(autocast_dtype(self.fc.weight))
        if self.fc_norm is not None:
            aux = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, aux.chunk(3, dim=-1))], dim=-1)
        return skinny_linear.linear(aux, self.fc.weight) if _fast(w) else self.fc(aux)

    def carry(self, hidden: torch.Tensor) -> torch.Tensor:
        """What a step's output hands to the next step (TTT and decoding alike): the layer's output itself,
        or with norm_output (EAGLE 3.1) its post-`norm` value, whose magnitude does not drift with depth."""
        return self.norm(hidden) if self.norm_output else hidden

    def rope(self, like: torch.Tensor, position_ids: torch.Tensor):
        return rope_cos_sin(self.rotary_emb, like, position_ids)

    def layer(self, embeds: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
              attend: AttendFn, w: Optional[DecodeWeights | UnrollWeights] = None) -> torch.Tensor:
        """One draft step. `hidden` is fc(features) at step 0 and the previous step's output after.
        Returns the new hidden state (pre-norm), which feeds the next step. `w`: decoding's layout of the
        projections (`decode_weights`; the same values, fewer launches), or the TTT unroll's
        (`unroll_weights`); None: the modules."""
        if _fast(w):
            return self._after_attention(hidden, attend(*self._before_attention(embeds, hidden, position_ids, w)), w)
        w = w if isinstance(w, UnrollWeights) else None  # decoding's layout under the deterministic switch: modules
        if self.checkpointing and torch.is_grad_enabled():
            # Recompute the two halves in backward instead of keeping their activations (the MLP's
            # [T, intermediate] tensors are the largest). The attention is the caller's and keeps state
            # (the TTT keys), so it is not recomputed.
            q, k, v = checkpoint(self._before_attention, embeds, hidden, position_ids, w, use_reentrant=False)
            return checkpoint(self._after_attention, hidden, attend(q, k, v), w, use_reentrant=False)
        q, k, v = self._before_attention(embeds, hidden, position_ids, w)
        return self._after_attention(hidden, attend(q, k, v), w)

    # The layer in two halves around the attention, which belongs to the caller. `compile_halves` compiles
    # each half (norms, rope, projections, MLP fuse into few kernels) and leaves the attention as it is.
    def _before_attention(self, embeds, hidden, position_ids, w: Optional[DecodeWeights | UnrollWeights] = None):
        m = self.midlayer
        cos, sin = self.rope(hidden, position_ids)
        x = torch.cat([m.input_layernorm(embeds), m.hidden_norm(hidden)], dim=-1)
        if w is None:
            return m.self_attn.qkv(x, cos, sin)
        qkv = w.linear(x, w.qkv) if isinstance(w, UnrollWeights) else skinny_linear.linear(x, w.qkv)
        return m.self_attn.heads(*qkv.split(w.widths, dim=-1), cos, sin)

    def _after_attention(self, hidden, o, w: Optional[DecodeWeights | UnrollWeights] = None):
        m = self.midlayer
        if w is None:
            h = hidden + m.self_attn.out(o)
            return h + m.mlp(m.post_attention_layernorm(h))
        if isinstance(w, UnrollWeights):
            h = hidden + w.linear(m.self_attn.merge(o), w.o)
            gate, up = w.linear(m.post_attention_layernorm(h), w.gate_up).chunk(2, dim=-1)
            return h + w.linear(m.mlp.act_fn(gate) * up, w.down)
        # the residual add and the norm in the gate/up projection's launch where the kernel serves
        norm = m.post_attention_layernorm
        gate_up, h = skinny_linear.add_norm_linear(
            hidden, skinny_linear.linear(m.self_attn.merge(o), m.self_attn.o_proj.weight), norm.weight, norm.eps,
            w.gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return h + skinny_linear.linear(m.mlp.act_fn(gate) * up, m.mlp.down_proj.weight)

    def _joined(self, dt: torch.dtype) -> tuple[torch.Tensor, tuple[int, int, int], torch.Tensor]:
        """q/k/v as one matrix (and their widths) and gate/up as one, in dtype `dt`: the layout both
        `decode_weights` and `unroll_weights` give."""
        a, f = self.midlayer.self_attn, self.midlayer.mlp
        qkv = torch.cat([a.q_proj.weight.to(dt), a.k_proj.weight.to(dt), a.v_proj.weight.to(dt)])
        widths = (a.q_proj.weight.shape[0], a.k_proj.weight.shape[0], a.v_proj.weight.shape[0])
        return qkv, widths, torch.cat([f.gate_proj.weight.to(dt), f.up_proj.weight.to(dt)])

    def decode_weights(self) -> DecodeWeights:
        """Decoding's layout of the projections (see `DecodeWeights`). A copy: build it after training, once
        per decoder."""
        with torch.no_grad():
            return DecodeWeights(*self._joined(self.midlayer.self_attn.q_proj.weight.dtype))

    def unroll_weights(self, sums: bool = False) -> UnrollWeights:
        """The TTT unroll's layout of the projections (see `UnrollWeights`): made per batch, in autograd, in the
        dtype autocast would cast the weights to (theirs without autocast). `sums`: the steps' weight gradients
        summed in place (`grad_sums`), where autograd records and the weights learn."""
        a, f = self.midlayer.self_attn, self.midlayer.mlp
        dt = autocast_dtype(a.q_proj.weight)
        qkv, widths, gate_up = self._joined(dt)
        mats = (qkv, a.o_proj.weight.to(dt), gate_up, f.down_proj.weight.to(dt))
        sums = sums and torch.is_grad_enabled() and all(m.requires_grad for m in mats)
        qkv, o, gate_up, down = (grad_sums.sunk(m) for m in mats) if sums else mats
        return UnrollWeights(qkv, widths, o, gate_up, down, sums)

    def compile_halves(self) -> None:
        """torch.compile the two halves of `layer` (training: `train.compile`). Instance attributes, so the
        state_dict and the decoder's copy of the class are untouched."""
        self._before_attention = torch.compile(self._before_attention)
        self._after_attention = torch.compile(self._after_attention)

    def logits(self, hidden: torch.Tensor, w: Optional[DecodeWeights] = None) -> torch.Tensor:
        """Logits over the draft vocab."""
        if _fast(w):
            return skinny_linear.add_norm_linear(hidden, None, self.norm.weight, self.norm.eps, self.lm_head.weight)[0]
        return self.lm_head(self.norm(hidden))


def _fast(w: Optional[DecodeWeights | UnrollWeights]) -> bool:
    """Whether a forward takes decoding's layout: given one, and not under the deterministic switch, whose
    decoding keeps the layout (and the bits) it has always had."""
    return isinstance(w, DecodeWeights) and not batch_invariant.active()


def init_draft_weights(draft: Eagle3Draft, seed: Optional[int] = None, std: float = 0.02) -> None:
    """Normal(0, std) for linear weights, ones for norms (what HF Llama init does)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in draft.named_parameters():
        if p.dim() == 2:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        else:
            with torch.no_grad():
                p.fill_(1.0)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

