"""Training checkpoints of a run on one process or on a (dp, tp) mesh.

One process: `step_N/` holds the serving-format draft and `train_state.pt` with everything (as before).
Several: rank 0 writes the serving-format draft (gathered whole) and `train_state.pt` with what all ranks
share (schedule, data position, mesh); every rank writes `train_state.rank{r}.pt` with its shard of the
weights and of the AdamW state and its RNG. All files go into `step_N.tmp/`, which rank 0 renames once
every rank's file is on disk, so a `step_N/` that exists is complete. Such a checkpoint resumes on the
same mesh (the same processes and parallel.tp_size)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..files import fsync_file
from ..eagle3.checkpoint import load_train_state, prune_checkpoints, save_draft
from .draft import full_state_dict, load_local_shards, local_shards
from .mesh import Dist, barrier, is_main


def rank_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"train_state.rank{rank}.pt"


def save_checkpoint(dist: Dist, draft, opt, folder: Path, dtype: torch.dtype, shared: dict, own: dict,
                    keep: int) -> Path:
    """`shared`: the run's state every rank holds alike (written once); `own`: this rank's (its RNG). Then
    the newest `keep` checkpoints are kept. Every rank calls it."""
    folder = Path(folder)
    if dist.world == 1:
        state = {"draft": draft.state_dict(), "optimizer": opt.state_dict(), **shared, **own}
        save_draft(draft, folder, dtype, train_state=state)
        prune_checkpoints(folder.parent, keep)
        return folder
    full = full_state_dict(draft, dist)  # collective: every rank takes part
    mine = {**local_shards(draft, opt), **own}

    def write_mine(tmp: Path):
        path = rank_file(tmp, dist.rank)
        torch.save(mine, path)
        fsync_file(path)  # (rank 0 syncs the folder too, but ranks may be on other hosts)

    def with_other_ranks(tmp: Path):  # rank 0, inside save_draft: after its own files, before the rename
        barrier(dist)  # (1) the .tmp folder exists
        write_mine(tmp)
        barrier(dist)  # (2) every rank's file is on disk

    if is_main(dist):
        save_draft(draft, folder, dtype, state_dict=full, before_publish=with_other_ranks,
                   train_state={**shared, "mesh": {"dp": dist.dp, "tp": dist.tp}})
        prune_checkpoints(folder.parent, keep)
    else:
        barrier(dist)  # (1)
        write_mine(folder.with_name(folder.name + ".tmp"))
        barrier(dist)  # (2)
    barrier(dist)  # (3) published: every rank may now read it
    return folder


def load_checkpoint(dist: Dist, draft, opt, folder: Path, total_steps: int) -> dict:
    """Loads the weights and AdamW state into `draft` and `opt`; returns the rest of the training state
    (schedule, position, and this rank's `rng`). A run of another length is refused before anything loads."""
    state = load_train_state(folder)
    if state["total_steps"] != total_steps:
        raise SystemExit(f"{folder}: saved by a run of {state['total_steps']} steps, this one has {total_steps} "
                         f"(train.max_steps / train.epochs / data changed); resume with the same settings")
    saved_mesh = state.get("mesh")
    here = {"dp": dist.dp, "tp": dist.tp}
    if dist.world == 1 and saved_mesh is None:
        draft.load_state_dict(state.pop("draft"))
        opt.load_state_dict(state.pop("optimizer"))
        return state
    if saved_mesh != here:
        was = (f"{saved_mesh['dp'] * saved_mesh['tp']} processes (dp={saved_mesh['dp']}, tp={saved_mesh['tp']})"
               if saved_mesh else "one process")
        raise SystemExit(f"{folder}: saved by a run on {was}; this one runs on {dist.world} (dp={dist.dp}, "
                         f"tp={dist.tp}). Resume with the layout that saved it.")
    path = rank_file(folder, dist.rank)
    if not path.is_file():
        raise SystemExit(f"{path}: missing; {folder} is not a complete checkpoint of this mesh")
    mine = torch.load(path, map_location="cpu", weights_only=False)
    load_local_shards(draft, opt, mine)
    state["rng"] = mine["rng"]
    return state


def rng_state(dist: Dist) -> dict:
    """One process: every GPU's generator; one of several: its own GPU's (touching the others would make
    a CUDA context on each)."""
    if not torch.cuda.is_available():
        cuda = []
    elif dist.world == 1:
        cuda = torch.cuda.get_rng_state_all()
    else:
        cuda = [torch.cuda.get_rng_state(dist.device)]
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict, dist: Dist) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if dist.world == 1:
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"][0], dist.device)
