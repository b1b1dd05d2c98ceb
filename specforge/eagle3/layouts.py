"""The draft checkpoint layouts the engines serve and the ecosystem publishes, to and from our Eagle3Draft.

Two layouts hold the same weights:
- SGLang's (`LlamaForCausalLMEagle3`; tensors `fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`), which SGLang
  serves and which SpecForge, AngelSlim and the EAGLE repository publish (their configs spell the
  architecture in several ways, may say `tie_word_embeddings`, may carry float16 `pytorch_model.bin`);
- the speculators layout (`Eagle3Speculator`: a `transformer_layer_config`, a `speculators_config`, the layer
  named `layers.0.*`, no `d2t`/`t2d` when the draft predicts the whole vocabulary), which vLLM serves.

Aux layers. Our ids are HF hidden-state indices: id j is the hidden state entering target layer j. The engines
read `eagle_aux_hidden_state_layer_ids` differently (docs: eagle3.md):
- SGLang reads `eagle_config.eagle_aux_hidden_state_layer_ids` and captures, for id j, the input of layer j+1:
  its ids are ours minus one;
- vLLM reads the speculators layout's top-level field and captures the input of layer j: its ids are ours.
Both capture the inputs of layers 2, N//2 and N-3 when the config names none, so default layers are written
as no ids at all, and a config without ids means the defaults of the target it is loaded for."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import LlamaConfig

from ..config import EAGLE31_FLAGS
from ..targets import default_aux_layers

SGLANG, SPECULATORS = "sglang", "speculators"
LAYOUTS = (SGLANG, SPECULATORS)
# How published Llama EAGLE-3 configs spell the architecture (AngelSlim's drafts say LlamaForCausalLMEEagle3;
# Eagle3LlamaForCausalLM is vLLM's own name for it).
LLAMA_EAGLE3 = ("LlamaForCausalLMEagle3", "LlamaForCausalLMEEagle3", "Eagle3LlamaForCausalLM")
SPECULATOR = "Eagle3Speculator"
# Tensors a speculators training checkpoint may keep that are the verifier's, not the draft's.
VERIFIER_TENSORS = ("verifier_lm_head.weight", "verifier_norm.weight")


def engine_ids(cfg: LlamaConfig) -> Optional[list[int]]:
    """Our aux ids as an export writes them: None when they are the defaults of the target (or unknown to be
    otherwise: a draft whose config named none)."""
    ids = getattr(cfg, "eagle_aux_hidden_state_layer_ids", None)
    n = getattr(cfg, "num_target_layers", None)
    if not ids or (n is not None and list(ids) == default_aux_layers(n)):
        return None
    return list(ids)


def _layer_fields(cfg: LlamaConfig, dtype: torch.dtype) -> dict:
    """The Llama fields both layouts share (the draft layer's shape, rope, the target's vocabulary)."""
    rope = dict(cfg.rope_parameters or {})
    out = {
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        # Explicit: the speculators model builds its rope from a copy of this config with hidden_size doubled,
        # so a head_dim left to hidden_size // heads would come out twice too wide there.
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def sglang_config(cfg: LlamaConfig, dtype: torch.dtype) -> dict:
    """SGLang's layout: ids (only when not the defaults) nested in `eagle_config`, in SGLang's convention;
    the EAGLE 3.1 flags at the top level, only when on (SpecForge's trainer reads an absent norm_output as
    its own default)."""
    out = {"architectures": [LLAMA_EAGLE3[0]], **_layer_fields(cfg, dtype), "draft_vocab_size": cfg.draft_vocab_size,
           "eagle_config": {"use_aux_hidden_state": True}}
    ids = engine_ids(cfg)
    if ids is not None:
        out["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [i - 1 for i in ids]
    for flag in EAGLE31_FLAGS:
        if getattr(cfg, flag, False):
            out[flag] = True
    return out


def speculators_config(cfg: LlamaConfig, dtype: torch.dtype, verifier: Optional[dict] = None,
                       speculative_tokens: int = 5) -> dict:
    """The speculators layout, with the fields its Eagle3SpeculatorConfig writes. `verifier`: the target as
    {name_or_path, architectures} (the speculators library loads its embedding from there; vLLM serves the
    draft with the model it is given)."""
    layer = _layer_fields(cfg, dtype)
    layer["rope_parameters"] = dict(cfg.rope_parameters or {"rope_type": "default", "rope_theta": layer["rope_theta"]})
    verifier = verifier or getattr(cfg, "verifier", None) or {}
    return {
        "architectures": [SPECULATOR],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": engine_ids(cfg),
        # vLLM reads an absent norm_before_residual as true: always written.
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": bool(getattr(cfg, "fc_norm", False)),
        "norm_output": bool(getattr(cfg, "norm_output", False)),
        "embed_requires_grad": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier.get("name_or_path"),
                         "architectures": list(verifier.get("architectures") or ["LlamaForCausalLM"])},
        },
        "torch_dtype": layer["torch_dtype"],
    }


def config_for(layout: str, cfg: LlamaConfig, dtype: torch.dtype, verifier: Optional[dict] = None) -> dict:
    if layout == SGLANG:
        return sglang_config(cfg, dtype)
    if layout == SPECULATORS:
        return speculators_config(cfg, dtype, verifier)
    raise SystemExit(f"draft layout {layout!r}: choose one of {', '.join(LAYOUTS)}")


def tensors_for(layout: str, state: dict, cfg: LlamaConfig, dtype: torch.dtype) -> dict:
    """The draft's tensors under the layout's names: floating ones in `dtype`, the vocab maps as they are."""
    out = {}
    for name, t in state.items():
        if name.startswith("rotary_emb"):
            continue
        if layout == SPECULATORS:
            if name in ("d2t", "t2d") and cfg.draft_vocab_size == cfg.vocab_size:
                continue  # the speculators model has no vocab maps for a full-vocabulary draft
            if name.startswith("midlayer."):
                name = "layers.0." + name.removeprefix("midlayer.")
        t = t.detach().cpu()
        out[name] = t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()
    return out


def _rope(layer: dict) -> dict:
    if layer.get("rope_parameters"):
        rope = dict(layer["rope_parameters"])
        rope.setdefault("rope_theta", layer.get("rope_theta", 10000.0))
    else:
        rope = {"rope_type": "default", "rope_theta": layer.get("rope_theta", 10000.0)}
        if layer.get("rope_scaling"):
            rope.update(layer["rope_scaling"])
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def read_config(raw: dict, path: Path) -> LlamaConfig:
    """A draft's config.json in either layout -> our LlamaConfig (ids mapped to ours; None when it names none).
    Besides Llama's fields the result says which layout it came from, where its ids were read (`ids_field`,
    for messages), whether it ties its lm_head to the embedding, and the verifier it names. What we cannot
    serve the same way (another layer type, more than one layer, norms we do not implement) is an error
    naming the field."""
    if not isinstance(raw, dict):
        raise SystemExit(f"{path}: expected a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures") or []
    if raw.get("speculators_model_type") is not None or SPECULATOR in archs:
        layout, prefix = SPECULATORS, "transformer_layer_config."
        if raw.get("speculators_model_type", "eagle3") != "eagle3":
            raise SystemExit(f"{path}: speculators_model_type={raw['speculators_model_type']!r}; only eagle3 "
                             f"drafts are EAGLE-3 drafts")
        layer = raw.get("transformer_layer_config")
        if not isinstance(layer, dict):
            raise SystemExit(f"{path}: field 'transformer_layer_config' is missing (a speculators-layout draft)")
        ids = written = raw.get("eagle_aux_hidden_state_layer_ids")
        ids_field = "eagle_aux_hidden_state_layer_ids"
        spec = raw.get("speculators_config") or {}
        verifier = spec.get("verifier") if isinstance(spec, dict) else None
    elif any(a in LLAMA_EAGLE3 for a in archs):
        layout, prefix, layer, verifier = SGLANG, "", raw, None
        nested = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        top = raw.get("eagle_aux_hidden_state_layer_ids")
        if nested:  # SGLang's convention: id j is the output of layer j
            if not isinstance(nested, list) or not all(isinstance(i, int) for i in nested):
                raise SystemExit(f"{path}: eagle_config.eagle_aux_hidden_state_layer_ids={nested}: want a list of "
                                 f"layer numbers")
            ids, written = [i + 1 for i in nested], nested
            ids_field = "eagle_config.eagle_aux_hidden_state_layer_ids"
            if top and list(top) != ids:
                raise SystemExit(f"{path}: eagle_config.eagle_aux_hidden_state_layer_ids={list(nested)} (SGLang: "
                                 f"outputs of those layers) and eagle_aux_hidden_state_layer_ids={list(top)} (vLLM: "
                                 f"inputs of those layers) name different layers; keep the one the draft was "
                                 f"trained on")
        else:  # vLLM reads a top-level field as it is
            ids = written = top
            ids_field = "eagle_aux_hidden_state_layer_ids"
    else:
        raise SystemExit(f"{path}: architectures={archs}; an EAGLE-3 draft is one of {', '.join(LLAMA_EAGLE3)} "
                         f"or {SPECULATOR} (the speculators layout)")
    if layer.get("model_type", "llama") != "llama":
        raise SystemExit(f"{path}: {prefix}model_type={layer['model_type']!r}; only Llama draft layers are supported")
    if layer.get("num_hidden_layers", 1) != 1:
        raise SystemExit(f"{path}: {prefix}num_hidden_layers={layer['num_hidden_layers']}; an EAGLE-3 draft here "
                         f"has one layer")
    for field in ("attention_bias", "mlp_bias"):
        if layer.get(field):
            raise SystemExit(f"{path}: {prefix}{field}=true; the draft layer has no biases")
    if layer.get("hidden_act", "silu") != "silu":
        raise SystemExit(f"{path}: {prefix}hidden_act={layer['hidden_act']!r}; the draft's MLP is SwiGLU (silu)")
    for field in ("norm_before_fc", "norm_before_residual"):
        if raw.get(field):
            raise SystemExit(f"{path}: {field}=true is not supported (fc_norm and norm_output are)")
    try:
        hidden, heads = layer["hidden_size"], layer["num_attention_heads"]
        target_hidden = raw.get("target_hidden_size")
        if target_hidden not in (None, hidden):
            raise SystemExit(f"{path}: target_hidden_size={target_hidden} differs from {prefix}hidden_size={hidden}; "
                             f"drafts narrower than their target are not supported")
        cfg = LlamaConfig(
            hidden_size=hidden, intermediate_size=layer["intermediate_size"], num_attention_heads=heads,
            num_key_value_heads=layer.get("num_key_value_heads") or heads,
            head_dim=layer.get("head_dim") or hidden // heads, num_hidden_layers=1,
            vocab_size=layer["vocab_size"], rms_norm_eps=layer.get("rms_norm_eps", 1e-6),
            max_position_embeddings=layer.get("max_position_embeddings", 8192), rope_parameters=_rope(layer),
            hidden_act="silu", tie_word_embeddings=False,
        )
    except KeyError as e:
        raise SystemExit(f"{path}: field '{prefix}{e.args[0]}' is missing (not an EAGLE-3 draft config?)") from None
    cfg.draft_vocab_size = raw.get("draft_vocab_size") or cfg.vocab_size
    if ids is not None and (not isinstance(ids, list) or len(ids) != 3 or not all(isinstance(i, int) for i in ids)):
        raise SystemExit(f"{path}: {ids_field}={written} in config.json; EAGLE-3 reads 3 layers")
    cfg.eagle_aux_hidden_state_layer_ids = list(ids) if ids else None
    cfg.fc_norm, cfg.norm_output = bool(raw.get("fc_norm", False)), bool(raw.get("norm_output", False))
    cfg.num_target_layers = (raw.get("specforge") or {}).get("num_target_layers")
    cfg.layout, cfg.field_prefix, cfg.ids_field = layout, prefix, ids_field
    cfg.ids_as_written = list(written) if ids else None
    cfg.tied_head = bool(layer.get("tie_word_embeddings", False))
    cfg.verifier = verifier if isinstance(verifier, dict) and verifier.get("name_or_path") else None
    return cfg


def read_tensors(folder: Path) -> dict:
    """The draft's tensors under our names (`midlayer.*`), from safetensors files or `pytorch_model*.bin`."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    tensors: dict = {}
    if files:
        for f in files:
            tensors.update(load_file(str(f)))
    else:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise SystemExit(f"{folder}: no .safetensors or pytorch_model.bin file")
        for f in bins:
            try:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:
                raise SystemExit(f"{f}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    out = {}
    for name, t in tensors.items():
        if name in VERIFIER_TENSORS:
            continue
        name = name.removeprefix("model.")
        if name.startswith("layers.0."):
            name = "midlayer." + name.removeprefix("layers.0.")
        out[name] = t
    return out
