"""Where training batches come from: tokenised samples in memory (online mode) or shards streamed from a
dump (offline mode). Both give the same batches for the same seed and epoch, and can start mid-epoch
(`skip`), which is what an exact resume needs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from ..config import Config
from .batching import collate, collate_packed, epoch_batches, epoch_packed_batches
from .regenerate import prompt_id
from .shards import read_shard, read_tokens


def prompt_groups(ids: list[str]) -> list[int]:
    """Each sample's prompt: the ordinal, in order of first appearance, of its id before any '#' (the answers
    of one prompt are `id`, `id#1`, ...: prepare.samples). A sample without an id is a prompt of its own, so
    data without '#' ids gets 0, 1, 2, ... (one prompt per sample)."""
    seen: dict[str, int] = {}
    out = []
    for i, sid in enumerate(ids):
        key = prompt_id(sid) if sid else f"\0{i}"
        out.append(seen.setdefault(key, len(seen)))
    return out


def is_held_out(cfg: Config, group: int) -> bool:
    """Without data.eval_path, every eval_every-th prompt (`prompt_groups`) is held out for evaluation, with
    all its answers: holding out every eval_every-th sample instead would, with 2 answers a prompt and an
    even eval_every, hold out only the sampled answers and train on their greedy twins."""
    k = cfg.data.eval_every
    return cfg.data.eval_path is None and k > 0 and group % k == k - 1


def batch_plan(lengths: list[int], batch_size: int, seed: int, epoch: int, pack_length: Optional[int]):
    """The epoch's batches as sample indices: lists of rows of indices when packing (`pack_length`, the
    row length), else lists of indices (one sample per row)."""
    if pack_length:
        return epoch_packed_batches(lengths, pack_length, batch_size, seed, epoch)
    return epoch_batches(len(lengths), lengths, batch_size, seed, epoch)


def make_batch(samples, plan_entry, pad_id: int, packed: bool):
    """One entry of `batch_plan` as a Batch (packed rows carry doc_ids and position_ids)."""
    if packed:
        return collate_packed([[samples[i] for i in row] for row in plan_entry], pad_id)
    return collate([samples[i] for i in plan_entry], pad_id)


class MemorySource:
    """Tokenised samples in memory (online mode). `pack_length`: pack training rows to that many tokens
    (train.pack); held-out batches stay unpacked."""

    def __init__(self, train_samples, eval_samples, batch_size: int, seed: int, pad_id: int,
                 pack_length: Optional[int] = None):
        self.train, self.eval = train_samples, eval_samples
        self.batch_size, self.seed, self.pad_id, self.pack_length = batch_size, seed, pad_id, pack_length
        self.lengths = [len(s.input_ids) for s in train_samples]

    def steps_per_epoch(self) -> int:
        """Packed, the count of epoch 0 (later epochs pack a little differently)."""
        if self.pack_length:
            return len(batch_plan(self.lengths, self.batch_size, self.seed, 0, self.pack_length))
        return math.ceil(len(self.train) / self.batch_size)

    def train_batches(self, epoch: int, skip: int = 0):
        """The epoch's batches after the first `skip` (a resumed run continues mid-epoch)."""
        for entry in batch_plan(self.lengths, self.batch_size, self.seed, epoch, self.pack_length)[skip:]:
            yield make_batch(self.train, entry, self.pad_id, bool(self.pack_length))

    def eval_batches(self):
        for i in range(0, len(self.eval), self.batch_size):
            yield collate(self.eval[i:i + self.batch_size], self.pad_id)


class ShardSource:
    """Samples streamed from a dump (offline mode): each epoch visits the shards in a seeded order,
    `window` shards at a time, and shuffles the samples inside a window, so memory holds at most `window`
    shards whatever the dataset size. A window holding every shard gives the batches of MemorySource."""

    def __init__(self, cfg: Config, folder: Path, manifest, window: int, pad_id: int):
        self.cfg, self.folder, self.manifest, self.window, self.pad_id = cfg, folder, manifest, window, pad_id
        self.batch_size, self.seed = cfg.train.batch_size, cfg.train.seed
        self.starts = [0]
        for s in manifest.shards:
            self.starts.append(self.starts[-1] + s["samples"])
        # Dumps made before prompt groups were recorded hold out by sample, as training then did.
        groups = manifest.groups if manifest.groups is not None else list(range(self.starts[-1]))
        if len(groups) != self.starts[-1]:
            raise SystemExit(f"{folder}: its groups.json lists {len(groups)} samples, its shards hold "
                             f"{self.starts[-1]}; the dump is damaged: rerun dump-hidden into an empty folder")
        self.held = [is_held_out(cfg, g) for g in groups]  # per sample, in dump order
        self.counts = [self.held[a:b].count(False) for a, b in zip(self.starts[:-1], self.starts[1:])]
        self.pack_length = cfg.data.max_length if cfg.train.pack else None
        self._tokens = None
        self.lengths = None
        if self.pack_length:  # a window's packing needs its samples' lengths
            self.lengths = [[len(s.input_ids) for s in shard] for shard in self.train_tokens()]

    def train_tokens(self) -> list:
        """Per shard, its training samples' ids and loss masks only (no features): read once, for the
        packing lengths and the draft vocab."""
        if self._tokens is None:
            self._tokens = [[s for j, s in enumerate(read_tokens(self.folder, e))
                             if not self.held[self.starts[i] + j]]
                            for i, e in enumerate(self.manifest.shards)]
        return self._tokens

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.manifest.shards), generator=g).tolist()

    def _windows(self, epoch: int):
        order = self._order(epoch)
        return [sorted(order[w:w + self.window]) for w in range(0, len(order), self.window)]

    def _num_batches(self, w: int, shards, epoch: int) -> int:
        if self.pack_length:
            return len(self._plan(w, epoch, [n for i in shards for n in self.lengths[i]]))
        return math.ceil(sum(self.counts[i] for i in shards) / self.batch_size)

    def _plan(self, w: int, epoch: int, lengths: list[int]):
        return batch_plan(lengths, self.batch_size, self.seed + w, epoch, self.pack_length)

    def steps_per_epoch(self) -> int:
        return sum(self._num_batches(w, win, 0) for w, win in enumerate(self._windows(0)))

    def _samples(self, shards, held_out: bool):
        out = []
        for i in shards:
            for j, s in enumerate(read_shard(self.folder, self.manifest.shards[i], self.manifest.identity.dtype)):
                if self.held[self.starts[i] + j] == held_out:
                    out.append(s)
        return out

    def train_batches(self, epoch: int, skip: int = 0):
        """The epoch's batches after the first `skip`; windows wholly skipped are not read."""
        for w, shards in enumerate(self._windows(epoch)):
            n = self._num_batches(w, shards, epoch)
            if skip >= n:
                skip -= n
                continue
            samples = self._samples(shards, held_out=False)
            for entry in self._plan(w, epoch, [len(s.input_ids) for s in samples])[skip:]:
                yield make_batch(samples, entry, self.pad_id, bool(self.pack_length))
            skip = 0

    def eval_batches(self):
        pending = []
        for i in range(len(self.manifest.shards)):
            pending += self._samples([i], held_out=True)
            while len(pending) >= self.batch_size:
                yield collate(pending[:self.batch_size], self.pad_id)
                pending = pending[self.batch_size:]
        if pending:
            yield collate(pending, self.pad_id)
