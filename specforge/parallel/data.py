"""Each dp group's share of a global batch."""

from __future__ import annotations

import torch

from ..data.batching import Batch
from .mesh import Dist


def check_batch_size(batch_size: int, dist: Dist) -> None:
    if batch_size % dist.dp:
        raise SystemExit(f"train.batch_size={batch_size} is the global batch and must be divisible by the data "
                         f"parallel size {dist.dp} (= {dist.world} processes // parallel.tp_size={dist.tp})")


def dp_rows(batch: Batch, dist: Dist) -> Batch:
    """Rows r with r % dp == dp_rank of the global batch (every rank builds the same global batches), with the
    padding columns no row of the share needs cut off. A share left without rows (the short last batch of an
    epoch) gets the batch's first row with an empty loss mask: the rank still takes part in every collective
    of the step and adds nothing to the loss or the gradient."""
    if dist.dp == 1:
        return batch
    n = batch.input_ids.shape[0]
    rows = list(range(dist.dp_rank, n, dist.dp))
    empty = not rows
    rows = rows or [0]
    length = int(batch.attention_mask[rows].sum(1).max())
    share = batch.map(lambda _, x: x[rows, :length])
    if empty:
        share.loss_mask = torch.zeros_like(share.loss_mask)
    return share
