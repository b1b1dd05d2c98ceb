"""Chat template tokenisation with a loss mask on assistant tokens only.

The mask is found by rendering growing prefixes of the conversation: the tokens an assistant turn adds
beyond the prefix that ends with the generation prompt are that turn's tokens (its text and the
end-of-turn marker), which is what the target itself produces at inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .conversations import Conversation, DataError


@dataclass
class Sample:
    input_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] bool, True on assistant tokens
    id: str = ""
    aux: Optional[torch.Tensor] = None  # [T, 3H] offline features, read back from a dump
    prenorm: Optional[torch.Tensor] = None  # [T, H]


def ensure_chat_template(tokenizer, template_file: Optional[str] = None) -> None:
    if template_file:
        tokenizer.chat_template = Path(template_file).read_text()
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "give one with data.chat_template=/path/to/template.jinja"
        )


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys") and "input_ids" in out:  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def tokenize_conversation(tokenizer, conv: Conversation, max_length: int) -> Sample:
    where = conv.meta.get("source", conv.id)
    if not any(m["role"] == "assistant" for m in conv.messages):
        raise DataError(f"{where}: conversation has no assistant turn")
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(conv.messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: message {i} (assistant) has empty content")
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, conv.messages[:i], add_generation_prompt=True)
        after = _render(tokenizer, conv.messages[: i + 1], add_generation_prompt=False)
        if after[: len(before)] != before or before[: len(ids)] != ids:
            raise DataError(f"{where}: the chat template does not render this conversation prefix-stably")
        mask += [False] * (len(before) - len(ids))
        ids = before
        turn = after[len(before):]
        # Keep the end-of-turn marker, drop trailing whitespace/newline tokens the template adds after it.
        while turn and tokenizer.decode(turn[-1:]).strip() == "":
            turn = turn[:-1]
        ids = ids + turn
        mask += [True] * len(turn)
    ids, mask = ids[:max_length], mask[:max_length]
    return Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), conv.id)


def prompt_ids(tokenizer, messages) -> list[int]:
    """Tokens of a conversation so far, ending with the prompt for the assistant's next turn."""
    return _render(tokenizer, messages, add_generation_prompt=True)
