"""Draft checkpoints: written in the layout an engine serves (layouts.py: SGLang's or the speculators layout
vLLM reads), read back from either, as we write them or as the ecosystem publishes them; and the folders of
training checkpoints.

A folder with config.json and model.safetensors; written under a temporary name and renamed, so a
folder that exists is complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig

from ..files import fsync_file
from ..targets import default_aux_layers
from .draft import Eagle3Draft
from .layouts import LAYOUTS, SGLANG, config_for, read_config, read_tensors, tensors_for


TRAIN_STATE = "train_state.pt"


def save_draft(draft: Eagle3Draft, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
               layout: str = SGLANG, verifier: Optional[dict] = None, extra: Optional[dict] = None,
               train_state: Optional[dict] = None, state_dict: Optional[dict] = None,
               before_publish: Optional[Callable[[Path], None]] = None) -> Path:
    """The draft in `layout` (layouts.py: sglang or speculators); `verifier` ({name_or_path, architectures})
    names the target in the speculators layout. `train_state` (optimizer, scheduler, data position, RNG,
    full-precision weights) goes in the same folder, so a folder that exists is a complete checkpoint to
    serve and to resume from. `state_dict`: the weights to write when `draft` holds only a shard (FSDP);
    `before_publish(tmp)` may add files to the temporary folder before it is synced and renamed (the other
    ranks' shards)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg = draft.config
    tensors = tensors_for(layout, draft.state_dict() if state_dict is None else state_dict, cfg, dtype)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = config_for(layout, cfg, dtype, verifier)
    ours = {"num_target_layers": getattr(cfg, "num_target_layers", None), **(extra or {})}
    config["specforge"] = {k: v for k, v in ours.items() if v is not None}
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


def read_draft_config(folder: Path) -> LlamaConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SystemExit(f"{folder}: not a draft checkpoint (no config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return read_config(raw, cfg_path)


def fit_target(cfg: LlamaConfig, folder: Path, vocab: Optional[int] = None, hidden: Optional[int] = None,
               num_layers: Optional[int] = None) -> None:
    """Refuses a draft made for another target, naming the config field that differs. With the target's
    depth, a draft that names no aux layers gets the defaults of this target (what both engines capture)."""
    p = cfg.field_prefix
    if vocab is not None and cfg.vocab_size != vocab:
        raise SystemExit(f"{folder}: {p}vocab_size={cfg.vocab_size} in config.json, but the target's vocabulary "
                         f"has {vocab} tokens (a draft for another target?)")
    if hidden is not None and cfg.hidden_size != hidden:
        raise SystemExit(f"{folder}: {p}hidden_size={cfg.hidden_size} in config.json, but the target's hidden "
                         f"size is {hidden} (a draft for another target?)")
    if num_layers is None:
        return
    ids = cfg.eagle_aux_hidden_state_layer_ids
    if ids is None:
        cfg.eagle_aux_hidden_state_layer_ids = default_aux_layers(num_layers)
    elif not all(0 <= i < num_layers for i in ids):
        how = "outputs" if cfg.ids_field.startswith("eagle_config.") else "inputs"
        raise SystemExit(f"{folder}: {cfg.ids_field}={cfg.ids_as_written} in config.json (the {how} of those "
                         f"layers), but the target has {num_layers} layers")
    cfg.num_target_layers = num_layers


def load_draft(folder: str | Path, embed_tokens: Optional[nn.Embedding] = None,
               dtype: torch.dtype = torch.float32, device="cpu",
               num_target_layers: Optional[int] = None) -> Eagle3Draft:
    """Any EAGLE-3 draft in either layout (ours, or as SpecForge, AngelSlim, the EAGLE repository or the
    speculators library publish them). With the target's embedding (and layer count), a draft made for another
    target is refused with the folder and the field that differs, and a draft naming no aux layers reads the
    defaults of this target."""
    folder = Path(folder)
    cfg = read_draft_config(folder)
    tensors = read_tensors(folder)
    if embed_tokens is not None:
        fit_target(cfg, folder, *embed_tokens.weight.shape, num_layers=num_target_layers)
    elif num_target_layers is not None:
        fit_target(cfg, folder, num_layers=num_target_layers)
    fc = tensors.get("fc.weight")
    if fc is not None and fc.dim() == 2 and fc.shape[1] != 3 * cfg.hidden_size:
        layers = f"{fc.shape[1] / cfg.hidden_size:g}"
        raise SystemExit(f"{folder}: fc.weight has input width {fc.shape[1]} = {layers} x hidden_size="
                         f"{cfg.hidden_size}; an EAGLE-3 draft reads 3 aux layers (input 3 x hidden_size = "
                         f"{3 * cfg.hidden_size})")
    own_embed = tensors.pop("embed_tokens.weight", None)
    if embed_tokens is None and own_embed is not None:
        embed_tokens = nn.Embedding.from_pretrained(own_embed.to(dtype), freeze=True).to(device)
    if "lm_head.weight" not in tensors and cfg.tied_head:
        # A tied draft predicts the whole vocabulary with the embedding as its head (how SGLang reads it).
        head = own_embed if own_embed is not None else (embed_tokens.weight if embed_tokens is not None else None)
        if head is None:
            raise SystemExit(f"{folder}: {cfg.field_prefix}tie_word_embeddings=true and no lm_head.weight: the "
                             f"head is the target's embedding, so load the draft with its target")
        if cfg.draft_vocab_size != cfg.vocab_size:
            raise SystemExit(f"{folder}: {cfg.field_prefix}tie_word_embeddings=true without lm_head.weight, but "
                             f"draft_vocab_size={cfg.draft_vocab_size} is not the whole vocabulary "
                             f"({cfg.vocab_size})")
        tensors["lm_head.weight"] = head.detach().cpu()
    maps = [k for k in ("d2t", "t2d") if k not in tensors]
    if maps and cfg.draft_vocab_size < cfg.vocab_size:
        raise SystemExit(f"{folder}: draft_vocab_size={cfg.draft_vocab_size} < {cfg.field_prefix}vocab_size="
                         f"{cfg.vocab_size}, but the checkpoint has no {' or '.join(maps)} (the map between the "
                         f"draft's and the target's tokens)")
    draft = Eagle3Draft(cfg, embed_tokens)
    try:
        missing, unexpected = draft.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a shape that disagrees with config.json
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise SystemExit(f"{folder}: tensor shapes do not match config.json ({detail})") from None
    missing = [m for m in missing if not m.startswith("rotary_emb") and m not in maps]
    if missing or unexpected:
        raise SystemExit(f"{folder}: tensors do not match an EAGLE-3 draft (missing {missing}, "
                         f"unexpected {unexpected})")
    mapped = draft.draft_to_target(torch.arange(cfg.draft_vocab_size))
    if mapped.min() < 0 or mapped.max() >= cfg.vocab_size:
        raise SystemExit(f"{folder}: d2t maps draft tokens to target ids outside [0, {cfg.vocab_size})")
    return draft.to(device=device, dtype=dtype)


def export_draft(src: str | Path, out: str | Path, layout: str, target=None) -> Path:
    """`specforge export`: a draft in either layout (ours or published) rewritten in `layout`, its weights in
    the dtype they are stored in. With `target` (a TargetConfig) the draft is checked against the target's
    config (widths, vocabulary, depth), a tied draft without an lm_head takes the target's embedding as its
    head, and the speculators layout names the target as the verifier."""
    if layout not in LAYOUTS:
        raise SystemExit(f"export --format {layout}: choose one of {', '.join(LAYOUTS)}")
    src = Path(src)
    stored = read_tensors(src)
    dtype = stored["fc.weight"].dtype if "fc.weight" in stored else torch.float32
    embed, verifier, tc = None, None, None
    if target is not None:
        from ..targets import checked_config, load_target_head, target_folder, text_config

        folder = target_folder(target)
        config = checked_config(folder)
        tc = text_config(config)
        verifier = {"name_or_path": target.hub_id or str(folder), "architectures": config.architectures}
        if "lm_head.weight" not in stored and read_draft_config(src).tied_head:
            embed = load_target_head(target, torch.device("cpu"), dtype).embed
    draft = load_draft(src, embed, dtype=dtype)
    if tc is not None:
        fit_target(draft.config, src, tc.vocab_size, tc.hidden_size, tc.num_hidden_layers)
    return save_draft(draft, out, dtype, layout=layout, verifier=verifier)


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
