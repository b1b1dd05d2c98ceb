"""The draft under FSDP2, and what training needs of the target when the target is split over tp ranks.

The draft is one `fully_shard` unit over `dist.draft_mesh`. Its forward (`Eagle3Draft.forward(fn, ...)`)
runs the whole TTT loss, so FSDP gathers the weights once per step and reduce-scatters the gradients once.
The target's embedding is not a parameter of the draft and stays outside; its lm_head is only read."""

from __future__ import annotations

from typing import Optional

import torch

from .mesh import Dist


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_draft(draft, dist: Dist):
    """FSDP2 over the draft (bf16 compute with float32 gradient reduction on CUDA, float32 on the CPU); a
    single process gets the draft back untouched. The inputs are not cast: the soft labels stay float32."""
    if dist.world == 1:
        return draft
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if dist.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy(cast_forward_inputs=False)
    fully_shard(draft, mesh=dist.draft_mesh, mp_policy=mp)
    return draft


def backward(loss: torch.Tensor, dist: Dist) -> None:
    """Each rank's loss is its share of the global mean (divided by the count of scored positions over all
    dp ranks), so the one-process gradient is the sum of the ranks' gradients. FSDP averages over the
    draft's dp * tp ranks, where the tp ranks of a dp group repeat the same gradient: scaling the loss by dp
    turns that average into the sum. (A custom FSDP divide factor would do the same, but Gloo lacks it.)"""
    (loss * dist.dp).backward()


def reshard(draft) -> None:
    """Free the gathered weights (a forward under no_grad, as in evaluation, leaves the root gathered)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(draft, FSDPModule):
        draft.reshard()


def full_state_dict(draft, dist: Dist) -> dict:
    """The whole draft's state dict: gathered tensor by tensor to the CPU of rank 0 (other ranks take part
    in the gathers and get {}); a single process's own state dict."""
    if dist.world == 1:
        return draft.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(draft, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _local(x):
    return x.to_local().detach().cpu() if isinstance(x, _dtensor()) else x


def local_shards(draft, opt) -> dict:
    """This rank's shard of the weights and of the AdamW state, as plain CPU tensors."""
    o = opt.state_dict()
    return {"draft": {k: _local(v) for k, v in draft.state_dict().items()},
            "optimizer": {"state": {i: {k: _local(v) for k, v in s.items()} for i, s in o["state"].items()},
                          "param_groups": o["param_groups"]}}


def load_local_shards(draft, opt, saved: dict) -> None:
    """The inverse of `local_shards` on the same mesh: copied into the sharded weights, and the AdamW moments
    rebuilt as DTensors laid out like their parameters."""
    DTensor = _dtensor()
    with torch.no_grad():
        for k, v in draft.state_dict().items():
            if k not in saved["draft"]:
                raise SystemExit(f"resume: the saved shard has no {k!r}")
            target = v.to_local() if isinstance(v, DTensor) else v
            if target.shape != saved["draft"][k].shape:
                raise SystemExit(f"resume: shard of {k!r} is {tuple(saved['draft'][k].shape)} here "
                                 f"{tuple(target.shape)}; resume on the mesh that saved it")
            target.copy_(saved["draft"][k])
    params = [p for group in opt.param_groups for p in group["params"]]

    def restore(p, v):
        if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0:  # moments; not the scalar step
            return DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                      stride=p.stride(), run_check=False)
        return v

    state = {i: {k: restore(params[i], v) for k, v in s.items()} for i, s in saved["optimizer"]["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": saved["optimizer"]["param_groups"]})


def replicated(t: Optional[torch.Tensor]):
    """A whole plain tensor from a tensor-parallel one (DTensor); others as they are."""
    return t.full_tensor() if isinstance(t, _dtensor()) else t


def replicated_head(head):
    """The target parts the draft reads, as whole plain tensors, gathered once: the lm_head (soft labels
    every step, the draft head's initial rows) and the frozen embedding the draft shares."""
    from torch import nn

    head.lm_head_weight = replicated(head.lm_head_weight)
    if isinstance(head.embed.weight, _dtensor()):
        head.embed = nn.Embedding.from_pretrained(replicated(head.embed.weight), freeze=True)
    return head
