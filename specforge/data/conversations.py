"""Reading conversations from JSONL, and the one place that turns a record into a Conversation.

Accepted records (a JSONL line, or a row of a dataset read through `datasets`, see tables.py):
- OpenAI / UltraChat form: {"messages": [{"role": "user", "content": "..."}, ...]}
- ShareGPT form:           {"conversations": [{"from": "human", "value": "..."}, ...]}
- older UltraChat form:    {"data": ["user turn", "answer", "user turn", ...]}  (alternating, user first)
- Alpaca form:             {"instruction": "...", "input": "...", "output": "..."}  (input, output optional)
- prompt forms:            {"turns": ["first user turn", "follow-up", ...]} or {"prompt": "..."}
  (user turns only, answers to be generated)
Every error names the file, the line and the field. With on_error="skip" bad lines are skipped instead,
counted, and reported once per file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

from ..files import replacing
from ..log import say

ROLE_ALIASES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "model": "assistant",
    "system": "system",
}


class DataError(ValueError):
    pass


@dataclass
class Conversation:
    messages: list[dict]  # [{"role": user|assistant|system, "content": str}]
    id: str = ""
    category: str = ""
    meta: dict = field(default_factory=dict)

    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


def bundled_path(name: str) -> Path:
    """A file shipped in specforge/data/prompts."""
    return Path(str(resources.files("specforge.data").joinpath("prompts", name)))


ON_ERROR = ("raise", "skip")


FIELDS = ("messages", "conversations", "data", "turns", "prompt", "instruction")
NO_ANSWER = "(answer prompts with `specforge prepare-data`)"


def parse_line(obj, where: str, need_answer: bool = False) -> Conversation:
    """One record as a Conversation. need_answer (training data): the conversation must hold an
    assistant turn, and no assistant turn may be empty; prompt files (bench, prepare-data) need neither.
    The first field of FIELDS that the record has decides its form."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj or "conversations" in obj:
        messages = _role_list(obj, where, need_answer)
    elif "data" in obj:
        messages = _alternating(obj["data"], where, need_answer)
    elif "turns" in obj:
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DataError(f"{where}: field 'turns' must be a non-empty list of non-empty strings")
        messages = [{"role": "user", "content": t} for t in turns]
        if need_answer:
            raise DataError(f"{where}: field 'turns' holds prompts only, no assistant turn {NO_ANSWER}")
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise DataError(f"{where}: field 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": obj["prompt"]}]
        if need_answer:
            raise DataError(f"{where}: field 'prompt' holds a prompt only, no assistant turn {NO_ANSWER}")
    elif "instruction" in obj:
        messages = _alpaca(obj, where, need_answer)
    else:
        raise DataError(f"{where}: no 'messages', 'conversations' or 'turns' field, nor 'data', 'prompt' or "
                        f"'instruction' (keys: {sorted(obj)})")
    return Conversation(messages=messages, id=str(obj.get("id", "")), category=str(obj.get("category", "")))


def _role_list(obj, where: str, need_answer: bool) -> list[dict]:
    """OpenAI `messages` (role/content) or ShareGPT `conversations` (from/value), with role aliases."""
    if "messages" in obj:
        key, role_key, text_key = "messages", "role", "content"
    else:
        key, role_key, text_key = "conversations", "from", "value"
    raw = obj[key]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field '{key}' must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise DataError(f"{where}: {key}[{i}] needs '{role_key}' and '{text_key}'")
        role = ROLE_ALIASES.get(str(m[role_key]).lower())
        if role is None:
            raise DataError(f"{where}: {key}[{i}].{role_key}: unknown role {m[role_key]!r}")
        if not isinstance(m[text_key], str):
            raise DataError(f"{where}: {key}[{i}].{text_key} must be a string")
        if need_answer and role == "assistant" and not m[text_key].strip():
            raise DataError(f"{where}: {key}[{i}].{text_key}: assistant text is empty")
        messages.append({"role": role, "content": m[text_key]})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field '{key}' has no assistant turn {NO_ANSWER}")
    return messages


def _alternating(raw, where: str, need_answer: bool) -> list[dict]:
    """The older UltraChat `data`: user and assistant texts alternating, the user first."""
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        raise DataError(f"{where}: field 'data' must be a non-empty list of strings (user and assistant turns "
                        "alternating, the user first)")
    messages = [{"role": "assistant" if i % 2 else "user", "content": t} for i, t in enumerate(raw)]
    for i, m in enumerate(messages):
        if m["role"] == "user" and not m["content"].strip():
            raise DataError(f"{where}: data[{i}]: user text is empty")
        if need_answer and m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: data[{i}]: assistant text is empty")
    if need_answer and len(messages) < 2:
        raise DataError(f"{where}: field 'data' has no assistant turn {NO_ANSWER}")
    return messages


def _alpaca(obj, where: str, need_answer: bool) -> list[dict]:
    """Alpaca records: the instruction (and its input, when given) asks, the output answers."""
    instruction, extra, output = obj["instruction"], obj.get("input", ""), obj.get("output", "")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: field 'instruction' must be a non-empty string")
    for key, value in (("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{key}' must be a string")
    messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}]
    if output.strip():
        messages.append({"role": "assistant", "content": output})
    elif need_answer:
        raise DataError(f"{where}: field 'instruction' has no 'output' {NO_ANSWER}")
    return messages


def read_jsonl(path: str | Path, on_error: str = "raise", need_answer: bool = False,
               report: Optional[dict] = None) -> Iterator[Conversation]:
    """Conversations of a JSONL file. on_error="raise": the first bad line is a DataError naming file, line
    and field; "skip": bad lines are left out and reported once, when the file is done. `report` (a dict)
    receives the counts of lines and kept lines and the first error, for a cache to say the same later."""
    if on_error not in ON_ERROR:
        raise DataError(f"data.on_error={on_error!r}: choose one of {', '.join(ON_ERROR)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines = kept = 0
    first = ""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            lines += 1
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line.rstrip())
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                conv = parse_line(obj, where, need_answer)
            except DataError as e:
                if on_error == "raise":
                    raise
                first = first or str(e)
                continue
            kept += 1
            conv.meta["source"] = where
            if not conv.id:
                conv.id = f"{path.stem}-{lineno}"
            yield conv
    if report is not None:
        report.update(lines=lines, kept=kept, first=first)
    if kept < lines:
        say(skipped_lines(path, lines, kept, first))
        if not kept:
            raise DataError(f"{path}: every line was bad (first: {first})")


def skipped_lines(path, lines: int, kept: int, first: str) -> str:
    return f"data: skipped {lines - kept} of {lines} lines of {path} (first: {first})"


def needs_answers(conv: Conversation) -> bool:
    return not any(m["role"] == "assistant" for m in conv.messages)


def write_jsonl(path: str | Path, conversations) -> None:
    """Written to a temporary name, then renamed: a killed run never leaves half a file."""
    with replacing(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps({"id": c.id, "category": c.category, "messages": c.messages}, ensure_ascii=False) + "\n")
