"""Offline features on disk: what `specforge dump-hidden` writes and offline training reads back.

A dump folder holds shards `shard_00000.safetensors`, ... (many samples each, tokens concatenated) and
`manifest.json` (what the dump was made from, and each shard's sample count, tokens and sha256). A shard
is written under a temporary name, flushed and renamed, and only then entered in the manifest (itself
replaced atomically), so a dump killed at any moment resumes after its last complete shard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..files import replacing, write_text
from .template import Sample

MANIFEST = "manifest.json"
GROUPS = "groups.json"  # each sample's prompt group, written once beside the manifest (it can be long)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class DumpIdentity:
    """What a dump was made from. A resumed dump, or training that reads one, must match it."""

    target: str
    target_config_sha256: str
    aux_layer_ids: list[int]
    dtype: str  # bfloat16 | float32 | float8 (e4m3 with a per-token scale)
    data_sha256: str  # the tokenised samples (ids and loss masks) themselves
    num_samples: int


@dataclass
class Manifest:
    identity: DumpIdentity
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    complete: bool = False
    # Each sample's prompt (sources.prompt_groups of the conversation ids), so that offline training holds
    # out the prompts online training does; None in dumps made before it was recorded. Kept in GROUPS, not in
    # the manifest, which is rewritten after every shard.
    groups: Optional[list[int]] = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards)

    def save(self, folder: Path) -> None:
        """The manifest; `save_groups` writes the groups, once."""
        body = {k: v for k, v in asdict(self).items() if k != "groups"}
        write_text(folder / MANIFEST, json.dumps({**body, "grouped": self.groups is not None,
                                                  "num_tokens": self.tokens, "num_bytes": self.bytes}, indent=2),
                   sync=True)


def save_groups(folder: Path, groups: list[int]) -> None:
    write_text(folder / GROUPS, json.dumps(groups), sync=True)


def load_manifest(folder: str | Path) -> Manifest | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest(identity=DumpIdentity(**raw["identity"]), shard_tokens=raw["shard_tokens"],
                            shards=raw["shards"], complete=raw["complete"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a specforge dump manifest ({e})") from None
    if raw.get("grouped"):
        groups = Path(folder) / GROUPS
        try:
            manifest.groups = json.loads(groups.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{groups}: the dump's prompt groups are missing or damaged ({e}); rerun "
                             f"dump-hidden into an empty folder") from None
    return manifest


def check_identity(have: DumpIdentity, want: DumpIdentity, folder) -> None:
    diff = [f"{k}: dump has {v!r}, this run {getattr(want, k)!r}" for k, v in asdict(have).items()
            if v != getattr(want, k)]
    if diff:
        raise SystemExit(f"{folder} holds a dump of other features; refusing to mix them:\n  " + "\n  ".join(diff))


def shard_bounds(lengths: list[int], shard_tokens: int) -> list[int]:
    """Sample index boundaries of the shards: fixed by the data alone, so a resumed dump cuts the same."""
    bounds, acc = [0], 0
    for i, n in enumerate(lengths):
        acc += n
        if acc >= shard_tokens:
            bounds.append(i + 1)
            acc = 0
    if bounds[-1] != len(lengths):
        bounds.append(len(lengths))
    return bounds


def samples_sha256(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.input_ids.to(torch.int64).numpy().tobytes())
        h.update(s.loss_mask.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def encode(x: torch.Tensor, dtype: str) -> dict:
    """Hidden states [N, D] as stored: bf16/fp32 as is; fp8 e4m3 with one float32 scale per token."""
    if dtype == "float8":
        scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        return {"": (x.float() / scale).to(torch.float8_e4m3fn), "scale": scale.squeeze(-1)}
    return {"": x.to(getattr(torch, dtype))}


def decode(tensors: dict, name: str, dtype: str) -> torch.Tensor:
    x = tensors[name]
    if dtype == "float8":
        return x.float() * tensors[name + ".scale"][:, None]
    return x


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3",
                      torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8"}


def write_shard(folder: Path, index: int, samples: list[Sample], dtype: str) -> dict:
    """Samples with their features (aux [T, 3H], prenorm [T, H]), tokens concatenated.

    The file is standard safetensors, but written piece by piece straight from each sample's tensors and
    hashed on the way: no concatenated copy, no serialised copy in memory and no second read to checksum,
    which is what kept the dump behind the target on large models (a shard of an 8B target is ~2 GB)."""
    name = f"shard_{index:05d}.safetensors"
    lengths = torch.tensor([len(s.input_ids) for s in samples])
    pieces = {
        "input_ids": [torch.cat([s.input_ids for s in samples]).to(torch.int32)],
        "loss_mask": [torch.cat([s.loss_mask for s in samples]).to(torch.uint8)],
        "offsets": [torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])],
    }
    for key in ("aux", "prenorm"):
        for s in samples:
            for suffix, t in encode(getattr(s, key), dtype).items():
                pieces.setdefault(key + (f".{suffix}" if suffix else ""), []).append(t.contiguous())
    header, offset = {"__metadata__": {"format": "specforge-hidden", "dtype": dtype}}, 0
    for key, parts in pieces.items():
        nbytes = sum(t.numel() * t.element_size() for t in parts)
        shape = [sum(t.shape[0] for t in parts), *parts[0].shape[1:]]
        header[key] = {"dtype": SAFETENSORS_DTYPES[parts[0].dtype], "shape": shape,
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    digest = hashlib.sha256()
    with replacing(folder / name, sync=True) as tmp, open(tmp, "wb") as f:
        for block in (len(head).to_bytes(8, "little"), head):
            f.write(block)
            digest.update(block)
        for parts in pieces.values():
            for t in parts:
                block = memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else b""
                f.write(block)  # both release the GIL on large blocks: the target keeps computing
                digest.update(block)
    return {"file": name, "samples": len(samples), "tokens": int(lengths.sum()),
            "bytes": 8 + len(head) + offset, "sha256": digest.hexdigest()}


def _check_size(path: Path, entry: dict) -> None:
    """A cheap first check (no full read): a missing or truncated shard."""
    if not path.is_file():
        raise SystemExit(f"{path}: shard listed in the manifest is missing")
    if path.stat().st_size != entry["bytes"]:
        raise SystemExit(f"{path}: corrupt or truncated shard ({path.stat().st_size} bytes on disk, the manifest "
                         f"says {entry['bytes']}; its checksum cannot match)")


def read_shard(folder: Path, entry: dict, dtype: str, verify: bool = True) -> list[Sample]:
    path = Path(folder) / entry["file"]
    _check_size(path, entry)
    if verify and file_sha256(path) != entry["sha256"]:
        raise SystemExit(f"{path}: checksum mismatch (corrupt or truncated shard); rerun dump-hidden after "
                         f"deleting it and its manifest entry, or the whole dump")
    try:
        t = load_file(str(path))
    except Exception as e:
        raise SystemExit(f"{path}: unreadable shard ({e})") from None
    off = t["offsets"].tolist()
    aux, prenorm = decode(t, "aux", dtype), decode(t, "prenorm", dtype)
    return [Sample(t["input_ids"][a:b].long(), t["loss_mask"][a:b].bool(), aux=aux[a:b], prenorm=prenorm[a:b])
            for a, b in zip(off[:-1], off[1:])]


def read_tokens(folder: Path, entry: dict) -> list[Sample]:
    """Only the ids and loss masks of a shard (for the draft vocab), without reading the features."""
    from safetensors import safe_open

    path = Path(folder) / entry["file"]
    _check_size(path, entry)
    with safe_open(str(path), framework="pt") as st:
        ids, mask, off = st.get_tensor("input_ids"), st.get_tensor("loss_mask"), st.get_tensor("offsets").tolist()
    return [Sample(ids[a:b].long(), mask[a:b].bool()) for a, b in zip(off[:-1], off[1:])]
