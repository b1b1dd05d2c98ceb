"""`specforge prepare-data`: answer every prompt with the target itself.

A draft is judged by how often it guesses the target's next token, so it learns best from the target's
own outputs rather than from answers some other model wrote. This module assembles the conversations turn
by turn; the answers come from a function the caller passes (specforge/generate.py's batched decoding)."""

from __future__ import annotations

from typing import Callable

from .conversations import Conversation

# answer(histories, jobs, turn) -> one text per history: the next assistant turn of each message list.
# jobs[i] = (prompt id, sample index) of history i (sample 0 is a prompt's first answer); turn: the user turn
# being answered (0-based).
Answer = Callable[[list[list[dict]], list[tuple[str, int]], int], list[str]]


def sample_id(conv_id: str, sample: int) -> str:
    """The first answer keeps the prompt's id; further samples get distinct ones."""
    return conv_id if sample == 0 else f"{conv_id}#{sample}"


def prompt_id(conv_id: str) -> str:
    """The prompt a conversation answers: `sample_id`'s inverse (the held-out split keeps a prompt's answers
    together by it)."""
    return conv_id.split("#")[0]


def regenerate(conversations: list[Conversation], answer: Answer, samples: int = 1) -> list[Conversation]:
    """Replace (or fill in) every assistant turn with the target's own answer, turn by turn: `samples`
    conversations per prompt (adjacent in the output, sample 0 first), each with its own answers."""
    convs = [Conversation(messages=[m for m in c.messages if m["role"] != "assistant"], id=c.id,
                          category=c.category) for c in conversations]
    jobs = [(c, k) for c in convs for k in range(samples)]
    max_turns = max((len(c.user_turns()) for c in convs), default=0)
    result = [[m for m in c.messages if m["role"] == "system"] for c, _ in jobs]
    for turn in range(max_turns):
        active = [j for j, (c, _) in enumerate(jobs) if len(c.user_turns()) > turn]
        for j in active:
            result[j].append({"role": "user", "content": jobs[j][0].user_turns()[turn]})
        answers = answer([result[j] for j in active], [(jobs[j][0].id, jobs[j][1]) for j in active], turn)
        for j, a in zip(active, answers):
            result[j].append({"role": "assistant", "content": a or "(no answer)"})
    return [Conversation(messages=m, id=sample_id(c.id, k), category=c.category) for m, (c, k) in zip(result, jobs)]
