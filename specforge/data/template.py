"""Chat template tokenisation with a loss mask on assistant tokens only.

The mask is found by rendering growing prefixes of the conversation: the tokens an assistant turn adds
beyond the prefix that ends with the generation prompt are that turn's tokens (its text and the
end-of-turn marker), which is what the target itself produces at inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..log import say
from .conversations import Conversation, DataError


@dataclass
class Sample:
    input_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] bool, True on assistant tokens
    id: str = ""
    aux: Optional[torch.Tensor] = None  # [T, 3H] offline features, read back from a dump
    prenorm: Optional[torch.Tensor] = None  # [T, H]


def ensure_chat_template(tokenizer, template_file: Optional[str] = None) -> None:
    """Fail before any work when the tokenizer cannot render a conversation, naming the tokenizer or the
    template file and saying how to give one."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    source = f"tokenizer {name!r}"
    if template_file:
        path = Path(template_file)
        if not path.is_file():
            raise DataError(f"data.chat_template={template_file}: no such file")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"data.chat_template={template_file}: the template file is empty")
        tokenizer.chat_template = text
        source = f"chat template {template_file}"
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {name!r} has no chat template; give one as a Jinja file with "
            "--chat-template FILE (or data.chat_template=FILE)"
        )
    try:
        _render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], False)
    except Exception as e:  # a broken template fails here, not in the middle of the data
        raise DataError(f"{source}: cannot render a two-turn conversation ({type(e).__name__}: {e})") from None


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys") and "input_ids" in out:  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def tokenize_conversation(tokenizer, conv: Conversation, max_length: int) -> Sample:
    """The first max_length tokens of a conversation and their loss mask."""
    ids, mask = _ids_and_mask(tokenizer, conv)
    ids, mask = ids[:max_length], mask[:max_length]
    return Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), conv.id)


def _ids_and_mask(tokenizer, conv: Conversation) -> tuple[list[int], list[bool]]:
    """All tokens of a conversation (untruncated) and the assistant-token mask."""
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
        try:
            before = _render(tokenizer, conv.messages[:i], add_generation_prompt=True)
            after = _render(tokenizer, conv.messages[: i + 1], add_generation_prompt=False)
        except Exception as e:  # e.g. a template that insists on alternating roles
            raise DataError(f"{where}: the chat template fails on message {i} ({type(e).__name__}: {e})") from None
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
    return ids, mask


TOO_LONG = ("truncate", "drop")


def tokenize_all(tokenizer, convs: list[Conversation], data, what: str = "conversations") -> list[Sample]:
    """Tokenise conversations the way training and dump-hidden both read them. `data` is the DataConfig:
    max_length with too_long=truncate|drop, and on_error=raise|skip for conversations that cannot be
    tokenised. What was truncated, dropped or skipped is printed once."""
    if data.too_long not in TOO_LONG:
        raise DataError(f"data.too_long={data.too_long!r}: choose one of {', '.join(TOO_LONG)}")
    if data.on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error={data.on_error!r}: choose one of raise, skip")
    samples: list[Sample] = []
    too_long, skipped, first = 0, 0, ""
    for conv in convs:
        try:
            ids, mask = _ids_and_mask(tokenizer, conv)
        except DataError as e:
            if data.on_error == "raise":
                raise
            skipped, first = skipped + 1, first or str(e)
            continue
        if len(ids) > data.max_length:
            too_long += 1
            if data.too_long == "drop":
                continue
            ids, mask = ids[:data.max_length], mask[:data.max_length]
        samples.append(Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), conv.id))
    if skipped:
        say(f"data: skipped {skipped} of {len(convs)} {what} that could not be tokenised (first: {first})")
    if too_long:
        done = "dropped" if data.too_long == "drop" else "truncated"
        say(f"data: {too_long} of {len(convs)} {what} longer than max_length={data.max_length} were {done}")
    if convs and not samples:
        raise DataError(f"data: none of the {len(convs)} {what} is usable"
                        f"{f' (first error: {first})' if first else ''}"
                        f"{f' ({too_long} longer than max_length={data.max_length}, dropped)' if too_long else ''}")
    return samples


def prompt_ids(tokenizer, messages) -> list[int]:
    """Tokens of a conversation so far, ending with the prompt for the assistant's next turn."""
    return _render(tokenizer, messages, add_generation_prompt=True)
