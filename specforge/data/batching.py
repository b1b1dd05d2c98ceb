"""Batches of tokenised samples: seeded shuffle, length bucketing, right padding."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    loss_mask: torch.Tensor  # [B, T] bool, assistant tokens
    aux: Optional[torch.Tensor] = None  # [B, T, 3H] offline features
    prenorm: Optional[torch.Tensor] = None  # [B, T, H]

    def to(self, device):
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                        for f in fields(self)})

    def pad_to_multiple(self, multiple: int) -> "Batch":
        """Right-pad the time axis to a multiple (padding is masked out everywhere): compiled kernels then
        meet a few lengths instead of one per batch."""
        t = self.input_ids.shape[1]
        extra = -t % multiple
        if extra == 0:
            return self
        pad = lambda x: torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)  # noqa: E731
        return Batch(**{f.name: None if getattr(self, f.name) is None else pad(getattr(self, f.name))
                        for f in fields(self)})

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(samples, pad_id: int = 0) -> Batch:
    t = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), t), pad_id, dtype=torch.long)
    att = torch.zeros(len(samples), t, dtype=torch.long)
    mask = torch.zeros(len(samples), t, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n], att[i, :n], mask[i, :n] = s.input_ids, 1, s.loss_mask
    batch = Batch(ids, att, mask)
    if samples[0].aux is not None:
        batch.aux = _pad([s.aux for s in samples], t)
        batch.prenorm = _pad([s.prenorm for s in samples], t)
    return batch


def _pad(rows, t: int) -> torch.Tensor:
    out = rows[0].new_zeros(len(rows), t, rows[0].shape[-1])
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def epoch_batches(num_samples: int, lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index lists for one epoch: shuffled with (seed, epoch), sorted by length inside windows of
    32 batches so rows of a batch have similar lengths, then the batches shuffled again."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=g).tolist()
    window = batch_size * 32
    batches = []
    for w in range(0, num_samples, window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]
