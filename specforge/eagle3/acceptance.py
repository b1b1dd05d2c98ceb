"""Greedy chain acceptance for every chain length from one pass of the draft over the target's own text.

While a chain's draft tokens agree with the target, the draft reads exactly the tokens of the target's greedy
text, so the TTT unroll over that text (the target's features from one forward) tells, at every position, how
many draft tokens a chain rooted there accepts. Replaying the rounds of a chain of S steps over those counts
gives its acceptance lengths without decoding it: one unroll serves every S (`specforge bench --sweep`). In exact
arithmetic this is what the decoder does; in bf16 on a GPU the two differ only where rounding flips a choice."""

from __future__ import annotations

import torch

from ..static_target import StaticTarget
from .draft import Eagle3Draft
from .ttt import ttt_unroll


@torch.no_grad()
def match_lengths(target: StaticTarget, draft: Eagle3Draft, ids: list[int], max_steps: int) -> list[int]:
    """For each root position n of the text `ids` (prompt and greedy answer): how many draft tokens of a chain
    of `max_steps` rooted at n (the root is ids[n]; the draft has read the features up to n-1) equal
    ids[n+1], ids[n+2], ... Entry 0 is 0 (no chain is rooted at the first token)."""
    length = len(ids)
    if length > target.max_len:
        raise ValueError(f"a text of {length} tokens does not fit the target's cache of {target.max_len}")
    device = draft.fc.weight.device
    tokens = torch.tensor([ids], device=device)
    pos = torch.arange(length, device=device)
    mask = torch.arange(target.max_len, device=device)[None, :] <= pos[:, None]
    _, aux = target(tokens, pos[None], pos, mask[None])
    hits = torch.zeros(max_steps, length, dtype=torch.bool, device=device)
    for k, hidden in ttt_unroll(draft, tokens, aux, max_steps, attention="reference"):
        # Step k's state at position t predicts the token at t + 2 + k.
        pred = draft.draft_to_target(draft.logits(hidden[0]).argmax(-1))
        span = length - 2 - k
        if span > 0:
            hits[k, :span] = pred[:span] == tokens[0, 2 + k:]
    leading = hits.long().cumprod(0).sum(0)  # at t: the chain rooted at t + 1
    return [0] + leading[:-1].tolist()


def chain_accept_lengths(matches: list[int], prompt_len: int, new_tokens: int, steps: int) -> list[int]:
    """The per-round acceptance lengths (bonus included) a chain of `steps` draft tokens gets on a greedy answer
    of `new_tokens` tokens after a prompt of `prompt_len`, given `match_lengths` of prompt + answer; the last
    round is cut at the answer's end, as the decoder cuts it."""
    produced, n, lengths = 1, prompt_len, []  # the prefill produced the first token (the first root, at n)
    while produced < new_tokens:
        accepted = min(matches[n] if n < len(matches) else 0, steps)
        take = min(accepted + 1, new_tokens - produced)
        lengths.append(take)
        produced += take
        n += accepted + 1
    return lengths
