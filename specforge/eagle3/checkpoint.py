"""Draft checkpoints in the serving format SGLang and vLLM load (LlamaForCausalLMEagle3), and back.

A folder with config.json and model.safetensors; written under a temporary name and renamed, so a
folder that exists is complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig

from ..data.shards import fsync_file
from .draft import Eagle3Draft


def serving_config(cfg: LlamaConfig, dtype: torch.dtype) -> dict:
    rope = dict(cfg.rope_parameters or {})
    out = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(cfg.eagle_aux_hidden_state_layer_ids),
            "use_aux_hidden_state": True,
        },
    }
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def speculators_config(serving: dict, verifier: str, num_speculative_tokens: int = 5) -> dict:
    """The same draft in vLLM's `speculators` layout: only the config differs."""
    layer = {k: v for k, v in serving.items() if k not in ("architectures", "eagle_config", "draft_vocab_size")}
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer,
        "draft_vocab_size": serving["draft_vocab_size"],
        "target_hidden_size": serving["hidden_size"],
        "eagle_aux_hidden_state_layer_ids": serving["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
        "norm_before_residual": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
        },
        "torch_dtype": serving["torch_dtype"],
    }


TRAIN_STATE = "train_state.pt"


def save_draft(draft: Eagle3Draft, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
               layout: str = "sglang", verifier: str = "", extra: Optional[dict] = None,
               train_state: Optional[dict] = None, state_dict: Optional[dict] = None,
               before_publish: Optional[Callable[[Path], None]] = None) -> Path:
    """`train_state` (optimizer, scheduler, data position, RNG, full-precision weights) goes in the same
    folder, so a folder that exists is a complete checkpoint to serve and to resume from. `state_dict`: the
    weights to write when `draft` holds only a shard (FSDP); `before_publish(tmp)` may add files to the
    temporary folder before it is synced and renamed (the other ranks' shards)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {}
    for name, t in (draft.state_dict() if state_dict is None else state_dict).items():
        if name.startswith("rotary_emb"):
            continue
        t = t.detach().cpu()
        tensors[name] = t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = serving_config(draft.config, dtype)
    if layout == "speculators":
        config = speculators_config(config, verifier)
    if extra:
        config["specforge"] = extra
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    if before_publish is not None:
        before_publish(tmp)
    for f in tmp.iterdir():  # on disk before the rename makes the folder visible
        fsync_file(f)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


def config_from_serving(config: dict) -> LlamaConfig:
    if config.get("architectures") == ["Eagle3Speculator"]:
        layer = dict(config["transformer_layer_config"])
        layer["draft_vocab_size"] = config["draft_vocab_size"]
        layer["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": config.get("eagle_aux_hidden_state_layer_ids")}
        config = layer
    rope = {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
    if config.get("rope_scaling"):
        rope.update(config["rope_scaling"])
        rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    cfg = LlamaConfig(
        hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        num_hidden_layers=1, vocab_size=config["vocab_size"], rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config.get("max_position_embeddings", 8192), rope_parameters=rope,
        hidden_act="silu", tie_word_embeddings=False,
    )
    cfg.draft_vocab_size = config.get("draft_vocab_size") or config["vocab_size"]
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    cfg.eagle_aux_hidden_state_layer_ids = list(ids) if ids else None
    return cfg


def load_draft(folder: str | Path, embed_tokens: Optional[nn.Embedding] = None,
               dtype: torch.dtype = torch.float32, device="cpu", num_target_layers: Optional[int] = None) -> Eagle3Draft:
    """Any checkpoint in the serving format (ours or trained elsewhere). With the target's embedding (and
    layer count), a draft made for another target is refused with the folder and the field that differs."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SystemExit(f"{folder}: not a draft checkpoint (no config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    try:
        cfg = config_from_serving(raw)
    except KeyError as e:
        raise SystemExit(f"{cfg_path}: field {e.args[0]!r} is missing (not a serving-format EAGLE-3 draft?)") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder}: no .safetensors file")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    if embed_tokens is not None:
        rows, width = embed_tokens.weight.shape
        if cfg.vocab_size != rows:
            raise SystemExit(f"{folder}: vocab_size={cfg.vocab_size} in config.json, but the target's vocabulary "
                             f"has {rows} tokens (a draft for another target?)")
        if cfg.hidden_size != width:
            raise SystemExit(f"{folder}: hidden_size={cfg.hidden_size} in config.json, but the target's hidden "
                             f"size is {width} (a draft for another target?)")
    ids = cfg.eagle_aux_hidden_state_layer_ids
    if ids is not None and len(ids) != 3:
        raise SystemExit(f"{folder}: eagle_aux_hidden_state_layer_ids={ids} in config.json; EAGLE-3 reads 3 layers")
    if ids and num_target_layers is not None and not all(0 <= i < num_target_layers for i in ids):
        raise SystemExit(f"{folder}: eagle_aux_hidden_state_layer_ids={ids} in config.json, but the target has "
                         f"{num_target_layers} layers")
    fc = tensors.get("fc.weight")
    if fc is not None and fc.dim() == 2 and fc.shape[1] != 3 * cfg.hidden_size:
        layers = f"{fc.shape[1] / cfg.hidden_size:g}"
        raise SystemExit(f"{folder}: fc.weight has input width {fc.shape[1]} = {layers} x hidden_size="
                         f"{cfg.hidden_size}; an EAGLE-3 draft reads 3 aux layers (input 3 x hidden_size = "
                         f"{3 * cfg.hidden_size})")
    own_embed = tensors.pop("embed_tokens.weight", None)
    if embed_tokens is None and own_embed is not None:
        embed_tokens = nn.Embedding.from_pretrained(own_embed.to(dtype), freeze=True).to(device)
    draft = Eagle3Draft(cfg, embed_tokens)
    try:
        missing, unexpected = draft.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a shape that disagrees with config.json
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise SystemExit(f"{folder}: tensor shapes do not match config.json ({detail})") from None
    missing = [m for m in missing if not m.startswith("rotary_emb")]
    if missing or unexpected:
        raise SystemExit(f"{folder}: tensors do not match an EAGLE-3 draft (missing {missing}, unexpected {unexpected})")
    return draft.to(device=device, dtype=dtype)


def step_folders(folder: Path) -> list[Path]:
    """Complete training checkpoints (`step_NNNNNNN` holding a train state), oldest first. Folders a killed
    save left behind (`*.tmp`, `*.old`) are not checkpoints."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_")
             and p.name[5:].isdigit() and (p / TRAIN_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all) and clear leftovers of interrupted saves."""
    for stale in list(folder.glob("step_*.tmp")) + list(folder.glob("step_*.old")):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in step_folders(folder)[:-keep]:
            # Renamed first, so that a kill during the removal leaves a `.old` folder (cleared next time), not a
            # `step_*` folder that has lost its train state and would never be pruned.
            gone = old.with_name(old.name + ".old")
            old.rename(gone)
            shutil.rmtree(gone)


def load_train_state(folder: Path) -> dict:
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        raise SystemExit(f"{folder}: not a training checkpoint (no {TRAIN_STATE}); resume needs a "
                         f"checkpoints/step_* folder written by `specforge train`")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"{path}: unreadable training state ({e})") from None
