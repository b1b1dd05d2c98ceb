"""Arrival counters for kernels whose programs each leave a partial result and whose last program to arrive
combines them (in a fixed order, so results repeat run after run): `cache_attention` (ranges of cache slots)
and `skinny_linear` (slices of K). The last program sets its counter back to zero, so one zeroed buffer per
device serves every call; calls that use it must not run on two streams at once."""

from __future__ import annotations

import torch

_counters: dict = {}
_made: list = []  # every counter buffer ever made: a captured graph keeps the address it saw


def counter_buffer(device: torch.device, n: int) -> torch.Tensor:
    """At least `n` zeroed int32 counters on `device`, made outside CUDA-graph capture only: memory made while
    capturing would not be zeroed until a replay (so a kernel using them is called once before capture)."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("arrival counters: call the kernel once outside CUDA-graph capture first (it makes "
                               "its zeroed counter buffer then)")
        buf = _counters[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _made.append(buf)
    return buf
