"""Training-time test: the draft unrolled on its own outputs for `ttt_length` steps, and its loss.

Step k at position t (all positions at once): the input token is token t+1+k, the hidden state is the
draft's step-(k-1) output at t (fc(features) at step 0), rope position t+k, and the target to match is
the target's next-token distribution at position t+1+k. Attention at step k: causal over the step-0
keys, plus the key of every step 1..k at the same position t (the diagonal). That is exactly what the
draft sees at inference as the (k+1)-th token of a chain, which `tests/test_ttt.py` checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .draft import Eagle3Draft


@dataclass
class SoftLabels:
    """The target's next-token distribution at every position, restricted to the draft vocab."""

    logits: torch.Tensor  # [B, T, Vd] target logits at the draft-vocab ids (float32)
    lse: torch.Tensor  # [B, T] log-sum-exp over the full target vocab (for expected acceptance)
    argmax: torch.Tensor  # [B, T] target's greedy next token (target id)


@torch.no_grad()
def soft_labels(final_hidden: torch.Tensor, lm_head_weight: torch.Tensor, draft_ids: torch.Tensor,
                needed: torch.Tensor | None = None, chunk: int = 1024) -> SoftLabels:
    """Target logits from its final (normed) hidden state at the `needed` positions (all if None; zeros
    elsewhere), chunked over tokens so full-vocab logits of at most `chunk` positions exist at a time."""
    b, t, h = final_hidden.shape
    if needed is None:
        needed = torch.ones(b, t, dtype=torch.bool, device=final_hidden.device)
    rows = final_hidden[needed]
    out_logits, out_lse, out_arg = [], [], []
    for s in range(0, rows.shape[0], chunk):
        full = rows[s:s + chunk] @ lm_head_weight.t()
        full = full.to(torch.promote_types(full.dtype, torch.float32))
        out_lse.append(torch.logsumexp(full, dim=-1))
        out_arg.append(full.argmax(-1))
        out_logits.append(full[:, draft_ids])
    dt = torch.promote_types(final_hidden.dtype, torch.float32)
    logits = final_hidden.new_zeros(b, t, draft_ids.numel(), dtype=dt)
    lse = final_hidden.new_zeros(b, t, dtype=dt)
    argmax = torch.zeros(b, t, dtype=torch.long, device=final_hidden.device)
    if out_logits:
        logits[needed], lse[needed], argmax[needed] = torch.cat(out_logits), torch.cat(out_lse), torch.cat(out_arg)
    return SoftLabels(logits, lse, argmax)


def shift_left(x: torch.Tensor, n: int, fill=0) -> torch.Tensor:
    """x[:, t] <- x[:, t + n]; the last n positions get `fill`."""
    if n == 0:
        return x
    pad = torch.full_like(x[:, :n], fill)
    return torch.cat([x[:, n:], pad], dim=1)


class TTTAttention:
    """Keys and values of every unrolled step; scores against step 0 are causal, against later steps
    diagonal. No [T, T*k] mask is ever built: the diagonal scores are row-wise dot products."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __call__(self, q, k, v):
        self.keys.append(k)
        self.values.append(v)
        b, hq, t, d = q.shape
        hk = k.shape[1]
        q = q.view(b, hk, hq // hk, t, d)  # group query heads by their kv head
        scale = d ** -0.5
        k0, v0 = self.keys[0].unsqueeze(2), self.values[0].unsqueeze(2)
        s0 = (q @ k0.transpose(-1, -2)) * scale  # [b, hk, g, t, t]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        s0 = s0.masked_fill(~causal, float("-inf"))
        diag = [(q * kj.unsqueeze(2)).sum(-1, keepdim=True) * scale for kj in self.keys[1:]]  # [b, hk, g, t, 1]
        scores = torch.cat([s0, *diag], dim=-1)
        p = torch.softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), dim=-1).to(q.dtype)
        out = p[..., :t] @ v0
        for j, vj in enumerate(self.values[1:]):
            out = out + p[..., t + j:t + j + 1] * vj.unsqueeze(2)
        return out.reshape(b, hq, t, d)


def ttt_unroll(draft: Eagle3Draft, input_ids: torch.Tensor, aux_hidden: torch.Tensor, steps: int):
    """Yields (k, hidden_k) for k = 0..steps-1; hidden_k[:, t] is the draft's state for the token it
    predicts at position t + 2 + k. Logits are `draft.logits(hidden_k)`."""
    b, t = input_ids.shape
    hidden = draft.fc(aux_hidden.to(draft.fc.weight.dtype))
    attend = TTTAttention()
    positions = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
    for k in range(steps):
        embeds = draft.embed(shift_left(input_ids, k + 1))
        hidden = draft.layer(embeds, hidden, positions + k, attend)
        yield k, hidden


@dataclass
class StepStats:
    loss: torch.Tensor  # scalar, mean soft cross-entropy over valid positions
    correct: torch.Tensor  # number of positions where draft argmax == target argmax
    accept: torch.Tensor  # sum over positions of sum_x min(p(x), q(x)) (expected acceptance)
    count: torch.Tensor  # positions scored


def ttt_loss(draft: Eagle3Draft, input_ids: torch.Tensor, loss_mask: torch.Tensor, aux_hidden: torch.Tensor,
             labels: SoftLabels, steps: int = 7, step_weight: float = 0.8, mask_out_of_vocab: bool = True):
    """Weighted TTT loss and per-step statistics.

    Position t at step k is scored when token t+2+k is an assistant token (loss_mask). Accuracy counts
    every scored position (a target argmax outside the draft vocab is a miss); the loss skips those
    positions when `mask_out_of_vocab`, since no draft distribution can put mass on them."""
    # The target at position p predicts token p+1: score p when token p+1 is in the loss mask.
    pred_mask = shift_left(loss_mask, 1, False)
    in_vocab = draft.t2d[labels.argmax]
    total = 0.0
    stats: list[StepStats] = []
    for k, hidden in ttt_unroll(draft, input_ids, aux_hidden, steps):
        # Only scored positions go through norm + lm_head: the [tokens, draft_vocab] logits are the
        # largest tensors of the step, and padding and prompt tokens need none.
        valid = shift_left(pred_mask, k + 1, False)
        rows = valid.nonzero(as_tuple=True)
        b_idx, t_idx = rows[0], rows[1] + k + 1  # the target position whose distribution is matched
        logits = draft.logits(hidden[rows])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logq = F.log_softmax(logits, dim=-1)
        tgt_logits = labels.logits[b_idx, t_idx]
        tgt_arg = labels.argmax[b_idx, t_idx]
        ce = -(torch.softmax(tgt_logits, dim=-1) * logq).sum(-1)
        weight = in_vocab[b_idx, t_idx].to(ce.dtype) if mask_out_of_vocab else torch.ones_like(ce)
        loss_k = (ce * weight).sum() / weight.sum().clamp(min=1)
        total = total + (step_weight ** k) * loss_k
        with torch.no_grad():
            correct = (draft.draft_to_target(logits.argmax(-1)) == tgt_arg).sum()
            p_full = torch.exp(tgt_logits - labels.lse[b_idx, t_idx].unsqueeze(-1))  # full-vocab target probs
            accept = torch.minimum(p_full, logq.exp()).sum()
        stats.append(StepStats(loss_k.detach(), correct, accept, torch.tensor(len(ce))))
    return total, stats
