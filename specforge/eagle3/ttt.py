"""Training-time test: the draft unrolled on its own outputs for `ttt_length` steps, and its loss.

Step k at position t (all positions at once): the input token is token t+1+k, the hidden state is the
draft's step-(k-1) output at t (fc(features) at step 0), rope position t+k, and the target to match is
the target's next-token distribution at position t+1+k. Attention at step k: causal over the step-0
keys, plus the key of every step 1..k at the same position t (the diagonal). That is exactly what the
draft sees at inference as the (k+1)-th token of a chain, which `tests/test_ttt.py` checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.fused_loss import HeadGrad, SoftLabels, fused_soft_ce, soft_ce_reference
from ..kernels.target_labels import label_rows
from ..kernels.ttt_attention import IMPLS as TTT_ATTENTION_IMPLS
from ..kernels.ttt_attention import ttt_attention
from .draft import Eagle3Draft


Index = tuple[torch.Tensor, torch.Tensor]  # (batch rows, positions), as `mask.nonzero(as_tuple=True)` gives


@dataclass
class Scored:
    """Where a batch is scored, as index pairs made from its masks where they live (the host, in training):
    `needed`, the positions whose target distribution the loss reads (`next_token_mask`), and per TTT step k
    the positions it scores (`step_mask`). With them on the device, neither `soft_labels` nor `ttt_loss` asks
    the GPU how many positions a mask holds (a boolean index or `nonzero` waits for all queued GPU work, and
    the host then cannot queue the next kernels while the GPU runs)."""

    needed: Index
    steps: list[Index]

    def map(self, fn) -> "Scored":
        """`fn` applied to every index tensor."""
        return Scored(tuple(fn(i) for i in self.needed), [tuple(fn(i) for i in ix) for ix in self.steps])

    def to(self, device, non_blocking: bool = False) -> "Scored":
        return self.map(lambda i: i.to(device, non_blocking=non_blocking))


def scored_index(loss_mask: torch.Tensor, doc_ids: torch.Tensor | None, steps: int) -> Scored:
    """The index pairs of `next_token_mask(loss_mask)` and of each step's `step_mask`, in the order
    `nonzero` gives (row-major), so indexing with them equals indexing with the masks, bit for bit."""
    pred = next_token_mask(loss_mask, doc_ids)
    return Scored(pred.nonzero(as_tuple=True),
                  [step_mask(pred, k, doc_ids).nonzero(as_tuple=True) for k in range(steps)])


@torch.no_grad()
def soft_labels(final_hidden: torch.Tensor, lm_head_weight: torch.Tensor, draft_ids: torch.Tensor,
                needed: torch.Tensor | Index | None = None, chunk: int = 1024) -> SoftLabels:
    """Target logits from its final (normed) hidden state at the `needed` positions (a mask, or its index
    pairs from `scored_index`; all if None; zeros elsewhere), chunked over tokens so full-vocab logits of at most
    `chunk` positions exist at a time; each chunk's lse, argmax and draft-vocab logits in one pass
    (`kernels.target_labels.label_rows`)."""
    b, t, h = final_hidden.shape
    if needed is None:
        needed = torch.ones(b, t, dtype=torch.bool, device=final_hidden.device)
    rows = final_hidden[needed]
    dt = torch.promote_types(final_hidden.dtype, torch.float32)
    n, vd = rows.shape[0], draft_ids.numel()
    row_logits = rows.new_empty(n, vd, dtype=dt)
    row_lse = rows.new_empty(n, dtype=dt)
    row_arg = torch.empty(n, dtype=torch.long, device=rows.device)
    for s in range(0, n, chunk):
        label_rows(rows[s:s + chunk] @ lm_head_weight.t(), draft_ids, row_logits[s:s + chunk], row_lse[s:s + chunk],
                   row_arg[s:s + chunk])
    logits = final_hidden.new_zeros(b, t, vd, dtype=dt)
    lse = final_hidden.new_zeros(b, t, dtype=dt)
    argmax = torch.zeros(b, t, dtype=torch.long, device=final_hidden.device)
    if n:
        logits[needed], lse[needed], argmax[needed] = row_logits, row_lse, row_arg
    return SoftLabels(logits, lse, argmax)


def shift_left(x: torch.Tensor, n: int, fill=0) -> torch.Tensor:
    """x[:, t] <- x[:, t + n]; the last n positions get `fill`."""
    if n == 0:
        return x
    pad = torch.full_like(x[:, :n], fill)
    return torch.cat([x[:, n:], pad], dim=1)


def next_token_mask(loss_mask: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Positions p whose next token p+1 is trained on (the target at p predicts it): in a packed row only
    where p+1 is in p's own conversation."""
    return step_mask(loss_mask, 0, doc_ids)


def step_mask(pred_mask: torch.Tensor, k: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Positions t that TTT step k scores: the target position t+1+k is in `pred_mask` and, in a packed row,
    in t's conversation (the shifted tokens of the next conversation are never scored)."""
    valid = shift_left(pred_mask, k + 1, False)
    if doc_ids is not None:
        valid = valid & (shift_left(doc_ids, k + 1, -2) == doc_ids)
    return valid


class TTTAttention:
    """Keys and values of every unrolled step; scores against step 0 are causal, against later steps
    diagonal. The math is `specforge.kernels.ttt_attention.ttt_attention` with `impl`: "sdpa" (causal flash
    attention merged with the diagonal; "auto" on CUDA for wide drafts), "flex" (no [T, T] scores per head;
    "auto" on CUDA for narrow drafts, packed rows and deterministic runs), "reference" (plain PyTorch; CPU
    default).
    `doc_ids` [B, T]: packed rows, the causal part stays inside each conversation."""

    def __init__(self, impl: str = "auto", doc_ids: torch.Tensor | None = None):
        if impl not in TTT_ATTENTION_IMPLS:
            raise ValueError(f"unknown TTT attention impl {impl!r}; one of {TTT_ATTENTION_IMPLS}")
        self.impl = impl
        self.doc_ids = doc_ids
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __call__(self, q, k, v):
        self.keys.append(k)
        self.values.append(v)
        return ttt_attention(q, self.keys, self.values, self.impl, self.doc_ids)


def ttt_unroll(draft: Eagle3Draft, input_ids: torch.Tensor, aux_hidden: torch.Tensor, steps: int,
               attention: str = "auto", doc_ids: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, sums: bool = False):
    """Yields (k, hidden_k) for k = 0..steps-1; hidden_k[:, t] is the draft's state for the token it
    predicts at position t + 2 + k. Logits are `draft.logits(hidden_k)`. `attention`: the TTTAttention
    impl ("auto", "sdpa", "flex", "reference"). Packed rows pass `doc_ids` and the per-conversation
    `position_ids` (rope position at step k: position_ids + k). `sums`: the steps' weight gradients summed in
    place (`grad_sums`, train.sum_weight_grads)."""
    b, t = input_ids.shape
    hidden = draft.project(aux_hidden)
    weights = draft.unroll_weights(sums)  # cast and laid out once for all the steps
    attend = TTTAttention(attention, doc_ids)
    positions = position_ids if position_ids is not None else \
        torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
    for k in range(steps):
        embeds = draft.embed(shift_left(input_ids, k + 1))
        out = draft.layer(embeds, hidden, positions + k, attend, weights)
        yield k, out
        hidden = draft.carry(out)


@dataclass
class StepStats:
    loss: torch.Tensor  # scalar, mean soft cross-entropy over valid positions
    correct: torch.Tensor  # number of positions where draft argmax == target argmax
    accept: torch.Tensor  # sum over positions of sum_x min(p(x), q(x)) (expected acceptance)
    count: torch.Tensor  # positions scored


def step_weights(loss_mask: torch.Tensor, labels: SoftLabels, t2d: torch.Tensor, steps: int,
                 mask_out_of_vocab: bool = True, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[steps]: the summed loss weight of the positions TTT step k scores (what its mean divides by), known
    before the unroll. Data parallel sums it over the ranks so that each rank's loss is its share of the
    global mean, and the summed gradient is that of one process on the whole batch."""
    scored = next_token_mask(loss_mask, doc_ids)  # as in ttt_loss: step k scores t when t+1+k is scored here
    if mask_out_of_vocab:
        scored = scored & t2d[labels.argmax]
    return torch.stack([step_mask(scored, k, doc_ids).sum() for k in range(steps)]).float()


def ttt_loss(draft: Eagle3Draft, input_ids: torch.Tensor, loss_mask: torch.Tensor, aux_hidden: torch.Tensor,
             labels: SoftLabels, steps: int = 7, step_weight: float = 0.8, mask_out_of_vocab: bool = True,
             fused: bool = True, loss_chunk: int | None = None, loss_recompute: bool = False,
             attention: str = "auto", denominators: torch.Tensor | None = None,
             doc_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
             tv_weight: float = 0.0, index: Scored | None = None, sum_weight_grads: bool = False):
    """Weighted TTT loss and per-step statistics.

    Position t at step k is scored when token t+2+k is an assistant token (loss_mask). Accuracy counts
    every scored position (a target argmax outside the draft vocab is a miss); the loss skips those
    positions when `mask_out_of_vocab`, since no draft distribution can put mass on them.

    `fused`: lm_head, loss and statistics go through `fused_soft_ce`, `loss_chunk` rows of logits at a time
    (default: 256 MB), so no step's [tokens, draft_vocab] logits stay alive until backward, and the steps sum
    their lm_head gradients into one buffer (`HeadGrad`) as they run (`loss_recompute`: keep even less and
    recompute the logits in backward, slower); else through `soft_ce_reference` (plain autograd). Both
    compute the same. `attention`: the TTT attention kernel (see `ttt_unroll`).
    `denominators` [steps]: what each step's weighted loss sum is divided by (default: its own weight sum,
    `step_weights`; data parallel passes the sum over all ranks). Packed rows pass `doc_ids` and
    `position_ids` (see `ttt_unroll`); a position is then scored only against its own conversation.
    `tv_weight` > 0: each row's loss adds that times its total variation from the target (one minus its
    expected acceptance; `soft_ce_reference`), which only the unfused path computes, so it takes that path.
    `index`: the batch's `scored_index(loss_mask, doc_ids, steps)` on this device; without it each step finds its
    positions with `nonzero` (the same positions, one host wait per step). `sum_weight_grads`: see `ttt_unroll`'s
    `sums`."""
    # The target at position p predicts token p+1: score p when token p+1 is in the loss mask.
    pred_mask = next_token_mask(loss_mask, doc_ids) if index is None else None
    in_vocab = draft.t2d[labels.argmax]
    head = draft.lm_head.weight
    fused = fused and not tv_weight
    # One lm_head gradient for all the steps (instead of a float32 copy per step held until backward).
    share = fused and not loss_recompute and step_weight > 0 and torch.is_grad_enabled() and head.requires_grad
    head_grad = HeadGrad(head) if share else None
    total = 0.0
    stats: list[StepStats] = []
    for k, hidden in ttt_unroll(draft, input_ids, aux_hidden, steps, attention, doc_ids, position_ids,
                                sum_weight_grads):
        # Only scored positions go through norm + lm_head: the [tokens, draft_vocab] logits are the
        # largest tensors of the step, and padding and prompt tokens need none.
        rows = index.steps[k] if index is not None else step_mask(pred_mask, k, doc_ids).nonzero(as_tuple=True)
        b_idx, t_idx = rows[0], rows[1] + k + 1  # the target position whose distribution is matched
        weight = in_vocab[b_idx, t_idx] if mask_out_of_vocab else None
        denom = None if denominators is None else denominators[k]
        normed = draft.norm(hidden[rows])
        coef = step_weight ** k
        if fused:
            loss_k, correct, accept, count = fused_soft_ce(normed, head, labels, b_idx, t_idx, weight, draft.d2t,
                                                           chunk=loss_chunk, recompute=loss_recompute,
                                                           denom=denom, head_grad=head_grad,
                                                           coef=coef if head_grad is not None else 1.0)
        else:
            loss_k, correct, accept, count = soft_ce_reference(normed, head, labels, b_idx, t_idx, weight,
                                                               draft.d2t, denom=denom, tv_weight=tv_weight)
        total = total + coef * loss_k
        stats.append(StepStats(loss_k.detach(), correct, accept, count))
    if head_grad is not None and stats:
        total = head_grad.tie(total)
    return total, stats
