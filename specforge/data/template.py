"""Chat template tokenisation with a loss mask on assistant tokens only.

The mask is found by rendering growing prefixes of the conversation: the tokens an assistant turn adds
beyond the prefix that ends with the generation prompt are that turn's tokens (its text and the
end-of-turn marker), which is what the target itself produces at inference.

Every conversation is tokenised by one `datasets.map` (data.num_proc processes), whose result is cached
under data.cache_dir and keyed by the messages' fingerprint, the tokenizer (vocab, merges, template) and
max_length: a rerun on the same data and tokenizer reads the cache. Truncation, drops and skips are then
counted from the cached columns."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..log import say
from .conversations import Conversation, DataError
from .tables import Table, data_cache, digest, from_conversations, num_proc, quiet


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
    try:
        ids, mask = _ids_and_mask(tokenizer, conv.messages)
    except DataError as e:
        raise DataError(f"{conv.meta.get('source', conv.id)}: {e}") from None
    ids, mask = ids[:max_length], mask[:max_length]
    return Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), conv.id)


def _ids_and_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """All tokens of a conversation (untruncated) and the assistant-token mask. Errors do not say where
    the conversation came from: the caller does (a cached error must not name a path it no longer has)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("conversation has no assistant turn")
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"message {i} (assistant) has empty content")
        if m["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:i], add_generation_prompt=True)
            after = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        except Exception as e:  # e.g. a template that insists on alternating roles
            raise DataError(f"the chat template fails on message {i} ({type(e).__name__}: {e})") from None
        if after[: len(before)] != before or before[: len(ids)] != ids:
            raise DataError("the chat template does not render this conversation prefix-stably")
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
TOKENS_FORMAT = 1  # bump when tokenisation writes something else for the same messages and tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides a tokenizer's output here: its whole tokenizer.json (vocab, merges, normaliser, added
    tokens) or, for a slow one, its vocab; the chat template and the special tokens it reads; the
    transformers version that renders the template."""
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return digest(type(tokenizer).__name__, transformers.__version__, body, tokenizer.chat_template,
                  tokenizer.special_tokens_map)


def tokenize_all(tokenizer, convs: list[Conversation], data, what: str = "conversations") -> list[Sample]:
    """Conversations held in memory, tokenised like every other source (tokenize_table)."""
    return tokenize_table(tokenizer, from_conversations(convs), data, what)


def tokenize_table(tokenizer, table: Table, data, what: str = "conversations") -> list[Sample]:
    """Tokenise conversations the way training and dump-hidden both read them. `data` is the DataConfig:
    max_length with too_long=truncate|drop, and on_error=raise|skip for conversations that cannot be
    tokenised. What was truncated, dropped or skipped is printed once."""
    if data.too_long not in TOO_LONG:
        raise DataError(f"data.too_long={data.too_long!r}: choose one of {', '.join(TOO_LONG)}")
    if data.on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error={data.on_error!r}: choose one of raise, skip")
    n = len(table)
    if not n:
        return []
    out = tokenized(tokenizer, table, data, what)
    errors = out.data.column("error").to_pylist()
    lengths = out.data.column("n_tokens").to_pylist()
    keep: list[int] = []
    too_long, skipped, first = 0, 0, ""
    for i in range(n):
        if errors[i]:
            message = f"{table.ds[i]['source']}: {errors[i]}"
            if data.on_error == "raise":
                raise DataError(message)
            skipped, first = skipped + 1, first or message
            continue
        if lengths[i] > data.max_length:
            too_long += 1
            if data.too_long == "drop":
                continue
        keep.append(i)
    if skipped:
        say(f"data: skipped {skipped} of {n} {what} that could not be tokenised (first: {first})")
    if too_long:
        done = "dropped" if data.too_long == "drop" else "truncated"
        say(f"data: {too_long} of {n} {what} longer than max_length={data.max_length} were {done}")
    if not keep:
        raise DataError(f"data: none of the {n} {what} is usable"
                        f"{f' (first error: {first})' if first else ''}"
                        f"{f' ({too_long} longer than max_length={data.max_length}, dropped)' if too_long else ''}")
    return _samples(out, keep, list(table.ds["id"]))


def tokenized(tokenizer, table: Table, data, what: str = "conversations"):
    """The tokenised table (columns input_ids and loss_mask cut to max_length, n_tokens before the cut,
    error), from the cache when it holds it, else mapped with data.num_proc processes and cached."""
    key = digest("tokens", TOKENS_FORMAT, table.fingerprint, tokenizer_fingerprint(tokenizer), data.max_length)
    folder = data_cache(data) / "tokens" / key
    cached = folder.is_dir() and any(folder.glob("tokens*.arrow"))
    with quiet(len(table)):
        out = table.ds.map(_tokenize_rows, batched=True, batch_size=256, input_columns=["messages"],
                           remove_columns=table.ds.column_names, features=_token_features(),
                           fn_kwargs={"tokenizer": tokenizer, "max_length": data.max_length},
                           num_proc=num_proc(data, len(table)), cache_file_name=str(folder / "tokens.arrow"),
                           new_fingerprint=key, desc=f"tokenising {what}")
    say(f"data: {len(table)} {what} tokenised ({'read from' if cached else 'cached in'} {folder})")
    return out


def _token_features():
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "loss_mask": List(Value("bool")),
                     "n_tokens": Value("int32"), "error": Value("string")})


def _tokenize_rows(batch, tokenizer, max_length: int) -> dict:
    out = {"input_ids": [], "loss_mask": [], "n_tokens": [], "error": []}
    for messages in batch:
        try:
            ids, mask = _ids_and_mask(tokenizer, messages)
            error = ""
        except DataError as e:
            ids, mask, error = [], [], str(e)
        out["input_ids"].append(ids[:max_length])
        out["loss_mask"].append(mask[:max_length])
        out["n_tokens"].append(len(ids))
        out["error"].append(error)
    return out


def _samples(out, keep: list[int], ids: list[str]) -> list[Sample]:
    """Samples of the kept rows, read from the arrow columns a record batch at a time."""
    samples: list[Sample] = []
    want = iter(keep)
    row = next(want, None)
    start = 0
    for rb in out.data.table.to_batches():
        if row is None:
            break
        tokens, mask = rb.column("input_ids"), rb.column("loss_mask")
        t_off, t_val = tokens.offsets.to_numpy(), tokens.values.to_numpy()
        m_off, m_val = mask.offsets.to_numpy(), mask.values.to_numpy(zero_copy_only=False)
        while row is not None and row < start + rb.num_rows:
            j = row - start
            samples.append(Sample(torch.from_numpy(t_val[t_off[j]:t_off[j + 1]].astype(np.int64)),
                                  torch.from_numpy(m_val[m_off[j]:m_off[j + 1]].copy()), ids[row]))
            row = next(want, None)
        start += rb.num_rows
    return samples


def prompt_ids(tokenizer, messages) -> list[int]:
    """Tokens of a conversation so far, ending with the prompt for the assistant's next turn."""
    return _render(tokenizer, messages, add_generation_prompt=True)
