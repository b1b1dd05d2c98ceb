"""The draft vocabulary: the most frequent loss-masked (assistant) tokens, sorted by target id.

d2t[i] = target_id - i for draft id i (so target_id = i + d2t[i]); t2d[t] is True for target ids kept."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import replacing


def count_tokens(samples, vocab_size: int, chunk: int = 8192) -> torch.Tensor:
    """How often each id below vocab_size is a loss-masked token. One bincount per `chunk` samples: one per
    sample added a vocab-sized vector each time, 82K parallel regions for the GPU recipe's data, and on the
    H200 with the GPU tests' processes beside it (2026-12-06) training sat over six minutes, busy on all
    cores, between tokenising and the vocab (this loop's place; not profiled)."""
    samples = list(samples)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(0, len(samples), chunk):
        ids = torch.cat([s.input_ids[s.loss_mask] for s in samples[i:i + chunk]])
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def build_vocab(counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top tokens by count; ties (and tokens never seen) go to the lower id, which in BPE vocabularies
    is the more common merge. Stable, so the same counts always give the same vocab."""
    vocab_size = counts.numel()
    if draft_vocab_size > vocab_size:
        raise ValueError(f"draft_vocab_size {draft_vocab_size} exceeds the target vocab {vocab_size}")
    order = torch.argsort(-counts, stable=True)
    kept = torch.sort(order[:draft_vocab_size]).values
    d2t = kept - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[kept] = True
    return d2t, t2d


def save_vocab(path: str | Path, d2t: torch.Tensor, t2d: torch.Tensor, counts: torch.Tensor) -> None:
    with replacing(path) as tmp:
        save_file({"d2t": d2t.contiguous(), "t2d": t2d.contiguous(), "counts": counts.contiguous()}, str(tmp))


def load_vocab(path: str | Path, target_vocab: int, draft_vocab_size: int):
    v = load_file(str(path))
    if v["t2d"].numel() != target_vocab or v["d2t"].numel() != draft_vocab_size:
        raise SystemExit(
            f"{path}: vocab is for target vocab {v['t2d'].numel()} / draft vocab {v['d2t'].numel()}, "
            f"but this run has {target_vocab} / {draft_vocab_size}; delete it or set data.vocab_path"
        )
    return v["d2t"], v["t2d"]


def coverage(counts: torch.Tensor, t2d: torch.Tensor) -> float:
    """Share of loss-masked tokens that fall inside the draft vocab."""
    total = counts.sum().item()
    return counts[t2d].sum().item() / total if total else 0.0
