"""The target under tensor parallelism: one plan per model family (torchtitan style), and a loader that reads
only this rank's slice of every weight, so that no rank ever holds the whole target.

Attention heads are split (q/k/v column-wise, o row-wise) and dense MLPs split on their intermediate axis
(gate/up column-wise, down row-wise) with DTensor styles. Fused 3-D expert weights have no DTensor style that
keeps each rank's gate and up halves together, so they (and an MoE block's shared expert) become plain local
tensors and a forward hook sums the block's output over the tp group: one all-reduce per MoE block.
Embedding, norms, routers and lm_head stay replicated (the draft needs the full lm_head on every rank).
Every decoder layer returns a replicated plain tensor, so FeatureCapture's hooks see full hidden states on
every rank. The target never takes a gradient: the hooks' all-reduce is not autograd-aware."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..targets import (checked_config, decoder_model, decoder_parts, load_tokenizer, resolve_dtype, target_folder,
                       text_config)

# Plain (non-DTensor) sharded parameters record here, on their module, how they were cut: name -> (dim, parts).
# `parts` = 2 for fused gate_up weights: each half (gate, up) is cut separately so a rank keeps matching halves.
PLAIN_SHARDS = "_tp_plain_shards"


def _attention_plan(prefix: str = "self_attn") -> dict:
    # Heads split: q/k/v column-wise, o row-wise (all-reduce). HF attention reshapes with -1 heads, so a rank
    # just sees fewer heads; per-head norms (Qwen3 q_norm/k_norm, Llama 4 L2 norm) act on local heads.
    return {f"{prefix}.q_proj": ColwiseParallel(), f"{prefix}.k_proj": ColwiseParallel(),
            f"{prefix}.v_proj": ColwiseParallel(), f"{prefix}.o_proj": RowwiseParallel()}


def _mlp_plan(prefix: str) -> dict:
    return {f"{prefix}.gate_proj": ColwiseParallel(), f"{prefix}.up_proj": ColwiseParallel(),
            f"{prefix}.down_proj": RowwiseParallel()}


def _check_divisible(tp: int, **sizes) -> None:
    bad = {k: v for k, v in sizes.items() if v is not None and v % tp}
    if bad:
        raise SystemExit(f"tensor parallel size {tp} does not divide {', '.join(f'{k}={v}' for k, v in bad.items())}")


def _local_cut(t: torch.Tensor, dim: int, parts: int, tp: int, rank: int) -> torch.Tensor:
    """This rank's piece of `t` along `dim`; with parts > 1, the rank's piece of each part, concatenated."""
    size = t.shape[dim] // parts
    n = size // tp
    pieces = [t.narrow(dim, k * size + rank * n, n) for k in range(parts)]
    return torch.cat(pieces, dim) if parts > 1 else pieces[0].clone()


def _shard_plain(module: nn.Module, name: str, dim: int, parts: int, tp_mesh) -> None:
    """Replace module.<name> by this rank's cut, a plain tensor (meta stays meta: the loader fills it)."""
    p = getattr(module, name)
    local = _local_cut(p.detach(), dim % p.dim(), parts, tp_mesh.size(), tp_mesh.get_local_rank())
    setattr(module, name, nn.Parameter(local, requires_grad=False))
    shards = dict(getattr(module, PLAIN_SHARDS, {}))
    shards[name] = (dim % p.dim(), parts)
    setattr(module, PLAIN_SHARDS, shards)


def _shard_plain_mlp(mlp: nn.Module, tp_mesh) -> None:
    """A gated MLP as plain local tensors whose output is a partial sum (its block all-reduces once)."""
    if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
        raise NotImplementedError("tensor parallel MoE: shared expert with biases")
    _shard_plain(mlp.gate_proj, "weight", 0, 1, tp_mesh)
    _shard_plain(mlp.up_proj, "weight", 0, 1, tp_mesh)
    _shard_plain(mlp.down_proj, "weight", 1, 1, tp_mesh)


def _sum_output_over(tp_mesh):
    """Forward hook: all-reduce (sum) a block's output, or the first item of a tuple output, in place."""
    group = tp_mesh.get_group()

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return output

    return hook


def parallelize_llama(model: nn.Module, tp_mesh) -> nn.Module:
    """Llama 3.x / SmolLM2 / Mistral / Qwen2 / Qwen3 dense: attention heads and MLP split."""
    tc = text_config(model.config)
    _check_divisible(tp_mesh.size(), num_attention_heads=tc.num_attention_heads,
                     num_key_value_heads=tc.num_key_value_heads, intermediate_size=tc.intermediate_size)
    _, layers, _, _ = decoder_parts(model)
    for layer in layers:
        parallelize_module(layer, tp_mesh, {**_attention_plan(), **_mlp_plan("mlp")})
    return model


def parallelize_llama4(model: nn.Module, tp_mesh) -> nn.Module:
    """Llama 4 text. Chunked-attention and no-rope layers differ only in mask and rotation, not in weights.
    MoE layers: router replicated; every expert and the shared expert cut on the intermediate axis
    (experts.gate_up_proj [E, H, 2I] per half on its last axis, experts.down_proj [E, I, H] on I); the block's
    output (shared + routed) summed over the tp group once. Dense layers (Maverick interleaves) as Llama."""
    tc = text_config(model.config)
    tp = tp_mesh.size()
    _check_divisible(tp, num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
                     intermediate_size=tc.intermediate_size, intermediate_size_mlp=tc.intermediate_size_mlp)
    _, layers, _, _ = decoder_parts(model)
    for layer in layers:
        plan = _attention_plan()
        ff = layer.feed_forward
        if hasattr(ff, "experts"):
            _shard_plain(ff.experts, "gate_up_proj", 2, 2, tp_mesh)
            _shard_plain(ff.experts, "down_proj", 1, 1, tp_mesh)
            _shard_plain_mlp(ff.shared_expert, tp_mesh)
            ff.register_forward_hook(_sum_output_over(tp_mesh))
        else:
            plan.update(_mlp_plan("feed_forward"))
        parallelize_module(layer, tp_mesh, plan)
    return model


def parallelize_qwen3_moe(model: nn.Module, tp_mesh) -> nn.Module:
    """Qwen3-MoE: router (`mlp.gate`) replicated; experts.gate_up_proj [E, 2I, H] cut per half on axis 1,
    experts.down_proj [E, H, I] on axis 2; the sparse block's output summed once. Dense layers
    (mlp_only_layers, decoder_sparse_step) as Llama."""
    tc = text_config(model.config)
    tp = tp_mesh.size()
    _check_divisible(tp, num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
                     moe_intermediate_size=tc.moe_intermediate_size, intermediate_size=tc.intermediate_size)
    _, layers, _, _ = decoder_parts(model)
    for layer in layers:
        plan = _attention_plan()
        if hasattr(layer.mlp, "experts"):
            if getattr(layer.mlp, "shared_expert", None) is not None:
                raise NotImplementedError("tensor parallel Qwen MoE with a shared expert (Qwen2-MoE)")
            _shard_plain(layer.mlp.experts, "gate_up_proj", 1, 2, tp_mesh)
            _shard_plain(layer.mlp.experts, "down_proj", 2, 1, tp_mesh)
            layer.mlp.register_forward_hook(_sum_output_over(tp_mesh))
        else:
            plan.update(_mlp_plan("mlp"))
        parallelize_module(layer, tp_mesh, plan)
    return model


PLANS = {
    "llama": parallelize_llama,
    "mistral": parallelize_llama,
    "qwen2": parallelize_llama,
    "qwen3": parallelize_llama,
    "llama4_text": parallelize_llama4,
    "qwen3_moe": parallelize_qwen3_moe,
}


def parallelize_target(model: nn.Module, tp_mesh) -> nn.Module:
    """Split a target over the 1-D device mesh `tp_mesh` in place (on meta or with weights; with weights,
    every rank must hold the same full model) and freeze it. Returns the model."""
    model_type = text_config(model.config).model_type
    plan = PLANS.get(model_type)
    if plan is None:
        raise SystemExit(f"tensor parallelism: no plan for model_type {model_type!r} "
                         f"(known: {', '.join(sorted(PLANS))}); run it with parallel.tp_size=1")
    plan(model, tp_mesh)
    return model.requires_grad_(False)


# ---------------------------------------------------------------------------------------------- loading


def shard_spec(model: nn.Module, name: str, param: torch.Tensor) -> Optional[tuple[int, int]]:
    """How parameter `name` is cut over the tp ranks: (dim, parts), or None where it is replicated."""
    if isinstance(param, DTensor):
        for pl in param.placements:
            if isinstance(pl, Shard):
                return (pl.dim % param.dim(), 1)
        return None
    mod_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod_name), PLAIN_SHARDS, {}).get(attr)


def local_slice(full: torch.Tensor, spec: Optional[tuple[int, int]], tp_mesh) -> torch.Tensor:
    """This rank's slice of a whole parameter, cut as `shard_spec` says (the whole tensor if replicated)."""
    if spec is None:
        return full
    return _local_cut(full, spec[0], spec[1], tp_mesh.size(), tp_mesh.get_local_rank())


def _checkpoint_index(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors file (from the index where there is one, else from the files' headers)."""
    from safetensors import safe_open

    idx = folder / "model.safetensors.index.json"
    if idx.is_file():
        return {k: str(folder / f) for k, f in json.loads(idx.read_text())["weight_map"].items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"target {folder}: no .safetensors files")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            out.update({k: str(f) for k in st.keys()})
    return out


def _checkpoint_key(name: str, index: dict) -> Optional[str]:
    """A causal LM's parameter name as the checkpoint spells it: as is, or under a multimodal wrapper
    (Llama4ForConditionalGeneration: `language_model.model.layers...`; newer VLMs: `model.language_model...`)."""
    candidates = [name, "language_model." + name]
    if name.startswith("model."):
        candidates.append("model.language_model." + name[len("model."):])
    return next((c for c in candidates if c in index), None)


class _Reader:
    """Reads slices of checkpoint tensors, keeping each file open once."""

    def __init__(self, folder: Path, tp: int, rank: int):
        self.index = _checkpoint_index(folder)
        self.tp, self.rank = tp, rank
        self._open = {}

    def _slice(self, key: str):
        from safetensors import safe_open

        f = self.index[key]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        return self._open[f].get_slice(key)

    def read(self, key: str, spec: Optional[tuple[int, int]]) -> torch.Tensor:
        sl = self._slice(key)
        shape = sl.get_shape()
        if spec is None:
            return sl[tuple(slice(None) for _ in shape)]
        dim, parts = spec
        size = shape[dim] // parts
        n = size // self.tp
        pieces = []
        for k in range(parts):
            idx = [slice(None)] * len(shape)
            idx[dim] = slice(k * size + self.rank * n, k * size + (self.rank + 1) * n)
            pieces.append(sl[tuple(idx)])
        return torch.cat(pieces, dim) if parts > 1 else pieces[0]

    def read_per_expert(self, name: str, spec: tuple[int, int]) -> Optional[torch.Tensor]:
        """A fused expert weight assembled from per-expert Linear weights (`experts.{e}.gate_proj.weight` ...,
        the hub layout of Qwen3-MoE), reading only this rank's rows (gate/up) or columns (down)."""
        prefix, _, fused = name.rpartition(".")
        dim, _ = spec
        if fused == "gate_up_proj":
            halves, cut, linear_dim = ("gate_proj", "up_proj"), 0, 1
        elif fused == "down_proj":
            halves, cut, linear_dim = ("down_proj",), 1, 2
        else:
            return None
        out, e = [], 0
        while True:
            keys = [_checkpoint_key(f"{prefix}.{e}.{h}.weight", self.index) for h in halves]
            if any(k is None for k in keys):
                break
            w = torch.cat([self.read(k, (cut, 1)) for k in keys], 0)  # Linear layout [out, in], local cut
            out.append(w if dim == linear_dim else w.t())
            e += 1
        return torch.stack(out) if out else None

    def close(self):
        self._open.clear()


@torch.no_grad()
def load_local_weights(model: nn.Module, folder: str | Path, tp_mesh) -> None:
    """Fill every parameter of a parallelized (and materialised) model with this rank's slice, read from the
    checkpoint's safetensors files; tied parameters are filled once."""
    reader = _Reader(Path(folder), tp_mesh.size(), tp_mesh.get_local_rank())
    try:
        for name, p in model.named_parameters():
            spec = shard_spec(model, name, p)
            local = p.to_local() if isinstance(p, DTensor) else p
            key = _checkpoint_key(name, reader.index)
            if key is not None:
                data = reader.read(key, spec)
            else:
                data = reader.read_per_expert(name, spec) if spec else None
                if data is None:
                    raise SystemExit(f"target {folder}: the checkpoint has no tensor for {name}")
            if tuple(data.shape) != tuple(local.shape):
                raise SystemExit(f"target {folder}: {name} is {tuple(data.shape)} in this rank's slice of the "
                                 f"checkpoint, the model wants {tuple(local.shape)}")
            local.copy_(data)
    finally:
        reader.close()


def _rebuild_rotary(model: nn.Module, tc, device) -> None:
    """to_empty leaves non-persistent buffers (rope frequencies) uninitialised: build the rotary module anew,
    in float32 as from_pretrained has it; any other buffer would be unknown state, so refuse."""
    base = decoder_model(model)
    base.rotary_emb = type(base.rotary_emb)(tc).to(device)
    other = [n for n, _ in model.named_buffers() if not n.endswith("inv_freq")]
    if other:
        raise NotImplementedError(f"tensor parallel loading: buffers with no known initialisation: {other}")


def load_target_tp(target_cfg, tp_mesh, device: torch.device, dtype: Optional[torch.dtype] = None):
    """Like targets.load_target, but split over `tp_mesh` (1-D): built on the meta device, parallelized, then
    materialised on `device` and filled with this rank's slices only. Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    folder = target_folder(target_cfg)
    tc = text_config(checked_config(folder))  # Llama 4 folders: the text-only causal LM
    dtype = dtype or resolve_dtype(target_cfg.dtype, torch.device(device))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tc)
    model.to(dtype)
    parallelize_target(model, tp_mesh)
    model.to_empty(device=device)
    embed, _, _, lm_head = decoder_parts(model)
    if getattr(tc, "tie_word_embeddings", False):
        lm_head.weight = embed.weight  # to_empty gave each its own storage
    load_local_weights(model, folder, tp_mesh)
    _rebuild_rotary(model, tc, device)
    model.eval().requires_grad_(False)
    return model, load_tokenizer(folder)
