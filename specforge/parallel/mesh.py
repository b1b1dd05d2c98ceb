"""The process layout of a run: `world` processes as a (dp, tp) mesh. tp ranks of one dp group share a copy
of the target (tensor parallel) and read the same rows; the dp groups split each batch.

Without a launcher's environment (RANK, WORLD_SIZE) there is one process and no process group: every helper
here is then a no-op, so the single-process path is exactly what it was before."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as tdist

from ..targets import resolve_device


@dataclass
class Dist:
    world: int
    rank: int
    local_rank: int
    dp: int
    tp: int
    dp_rank: int
    tp_rank: int
    device: torch.device
    mesh: Optional[object] = None  # DeviceMesh (dp, tp); None for a single process
    dp_mesh: Optional[object] = None
    tp_mesh: Optional[object] = None
    # What the draft is sharded over: the dp mesh, or every rank when tp > 1, so that tp ranks (which compute
    # the same gradients up to rounding) still hold one copy of the weights that cannot drift apart.
    draft_mesh: Optional[object] = None

    @property
    def dp_group(self):
        return self.dp_mesh.get_group() if self.dp_mesh is not None else None


def launched() -> bool:
    """Whether a launcher (torchrun, `specforge train --nproc N`) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(cfg) -> Dist:
    """The run's Dist. Under a launcher: a process group (NCCL on CUDA with device cuda:LOCAL_RANK, else
    gloo) and the (dp, tp) device mesh; otherwise a single process on `cfg.device`."""
    tp = cfg.parallel.tp_size
    if tp < 1:
        raise SystemExit(f"parallel.tp_size={tp}: must be at least 1")
    if not launched():
        if tp != 1:
            raise SystemExit(f"parallel.tp_size={tp} needs {tp} processes (or a multiple): launch with "
                             f"`specforge train --nproc {tp} ...` (or `bench`) or "
                             f"`torchrun --nproc-per-node {tp} -m specforge train ...`")
        return Dist(1, 0, 0, 1, 1, 0, 0, resolve_device(cfg.device))
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world % tp:
        raise SystemExit(f"parallel.tp_size={tp} does not divide the {world} processes; launch a multiple of "
                         f"{tp} processes (data parallel size = processes // tp_size)")
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        if device.type == "cuda":
            tdist.init_process_group("nccl", device_id=device)
        else:
            tdist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // tp
    mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    draft_mesh = mesh["dp"] if tp == 1 else init_device_mesh(device.type, (world,), mesh_dim_names=("all",))
    return Dist(world, rank, local_rank, dp, tp, mesh.get_local_rank("dp"), mesh.get_local_rank("tp"), device,
                mesh, mesh["dp"], mesh["tp"], draft_mesh)


def shutdown(dist: Dist) -> None:
    if dist.world > 1 and tdist.is_initialized():
        tdist.destroy_process_group()


def is_main(dist: Optional[Dist]) -> bool:
    """Rank 0 alone writes files, logs and prints."""
    return dist is None or dist.rank == 0


def barrier(dist: Optional[Dist]) -> None:
    if dist is not None and dist.world > 1:
        if dist.device.type == "cuda":
            tdist.barrier(device_ids=[dist.device.index])
        else:
            tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the group's ranks, in place (returned for chaining); no-op without a process group."""
    if tdist.is_initialized() and tdist.get_world_size(group) > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM, group=group)
    return tensor


def exists_everywhere(dist: Optional[Dist], path: Path) -> bool:
    """Whether `path` exists, looked at by every rank before any rank goes on (and may create it): all
    ranks then take the same branch (build it, or read it)."""
    found = Path(path).exists()
    barrier(dist)
    return found
