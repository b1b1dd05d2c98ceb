"""Batches of tokenised samples: seeded shuffle, length bucketing, right padding; or packing (several
conversations per row, `train.pack`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from .template import Sample


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    loss_mask: torch.Tensor  # [B, T] bool, assistant tokens
    aux: Optional[torch.Tensor] = None  # [B, T, 3H] offline features
    prenorm: Optional[torch.Tensor] = None  # [B, T, H]
    # Packed rows only (None otherwise): which conversation of its row each token belongs to (0, 1, ...; -1
    # on padding), and its position inside that conversation (rope restarts at 0 for each).
    doc_ids: Optional[torch.Tensor] = None  # [B, T] long
    position_ids: Optional[torch.Tensor] = None  # [B, T] long

    def map(self, fn) -> "Batch":
        """A batch of `fn(name, tensor)` for every tensor it holds (fields left None stay None)."""
        return Batch(**{f.name: None if getattr(self, f.name) is None else fn(f.name, getattr(self, f.name))
                        for f in fields(self)})

    def to(self, device, non_blocking: bool = False):
        return self.map(lambda _, x: x.to(device, non_blocking=non_blocking))

    def pad_to_multiple(self, multiple: int) -> "Batch":
        """Right-pad the time axis to a multiple (padding is masked out everywhere): compiled kernels then
        meet a few lengths instead of one per batch."""
        t = self.input_ids.shape[1]
        extra = -t % multiple
        if extra == 0:
            return self
        def pad(name, x):  # padding belongs to no conversation: doc id -1
            fill = -1 if name == "doc_ids" else 0
            return torch.cat([x, x.new_full((x.shape[0], extra, *x.shape[2:]), fill)], dim=1)

        return self.map(pad)

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


def pack_rows(order: list[int], lengths: list[int], max_length: int, open_rows: int = 32) -> list[list[int]]:
    """Samples (in the given order) packed into rows of at most `max_length` tokens, first fit among the
    last `open_rows` rows started (bounded, so linear in the number of samples). A sample longer than
    max_length gets a row of its own. Deterministic given the order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r in range(max(0, len(rows) - open_rows), len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def epoch_packed_batches(lengths: list[int], max_length: int, batch_size: int, seed: int,
                         epoch: int) -> list[list[list[int]]]:
    """One epoch of packed batches: `batch_size` rows each, a row a list of sample indices. The samples are
    shuffled with (seed, epoch) as in `epoch_batches`, so batches are a function of seed and epoch (resume
    skips into the same list)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    rows = pack_rows(torch.randperm(len(lengths), generator=g).tolist(), lengths, max_length)
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def collate_packed(rows, pad_id: int = 0) -> Batch:
    """Rows of samples laid end to end, right-padded; doc_ids and position_ids say where each conversation
    starts, so the target and the draft can keep them apart."""
    batch = collate([_concat(row) for row in rows], pad_id)
    t = batch.input_ids.shape[1]
    batch.doc_ids = torch.full((len(rows), t), -1, dtype=torch.long)
    batch.position_ids = torch.zeros(len(rows), t, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, s in enumerate(row):
            n = len(s.input_ids)
            batch.doc_ids[r, start:start + n] = d
            batch.position_ids[r, start:start + n] = torch.arange(n)
            start += n
    return batch


def _concat(samples) -> Sample:
    cat = lambda name: None if getattr(samples[0], name) is None else torch.cat([getattr(s, name) for s in samples])  # noqa: E731
    return Sample(cat("input_ids"), cat("loss_mask"), aux=cat("aux"), prenorm=cat("prenorm"))
