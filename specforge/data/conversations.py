"""Reading conversations from JSONL.

Accepted lines (one JSON object each):
- OpenAI form:   {"messages": [{"role": "user", "content": "..."}, ...]}
- ShareGPT form: {"conversations": [{"from": "human", "value": "..."}, ...]}
- prompt form:   {"turns": ["first user turn", "follow-up", ...]}  (user turns only, answers to be generated)
Every error names the file, the line and the field. With on_error="skip" bad lines are skipped instead,
counted, and reported once per file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

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


def parse_line(obj, where: str, need_answer: bool = False) -> Conversation:
    """One JSONL object as a Conversation. need_answer (training data): the conversation must hold an
    assistant turn, and no assistant turn may be empty; prompt files (bench, prepare-data) need neither."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "turns" in obj and not ("messages" in obj or "conversations" in obj):
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DataError(f"{where}: field 'turns' must be a non-empty list of non-empty strings")
        messages = [{"role": "user", "content": t} for t in turns]
        if need_answer:
            raise DataError(f"{where}: field 'turns' holds prompts only, no assistant turn "
                            "(answer prompts with `specforge prepare-data`)")
    else:
        if "messages" in obj:
            key, role_key, text_key = "messages", "role", "content"
        elif "conversations" in obj:
            key, role_key, text_key = "conversations", "from", "value"
        else:
            raise DataError(f"{where}: no 'messages', 'conversations' or 'turns' field (keys: {sorted(obj)})")
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
            raise DataError(f"{where}: field '{key}' has no assistant turn "
                            "(answer prompts with `specforge prepare-data`)")
    return Conversation(messages=messages, id=str(obj.get("id", "")), category=str(obj.get("category", "")))


def read_jsonl(path: str | Path, on_error: str = "raise", need_answer: bool = False) -> Iterator[Conversation]:
    """Conversations of a JSONL file. on_error="raise": the first bad line is a DataError naming file, line
    and field; "skip": bad lines are left out and reported once, when the file is done."""
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
    if kept < lines:
        say(f"data: skipped {lines - kept} of {lines} lines of {path} (first: {first})")
        if not kept:
            raise DataError(f"{path}: every line was bad (first: {first})")


def needs_answers(conv: Conversation) -> bool:
    return not any(m["role"] == "assistant" for m in conv.messages)


def write_jsonl(path: str | Path, conversations) -> None:
    """Written to a temporary name, then renamed: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps({"id": c.id, "category": c.category, "messages": c.messages}, ensure_ascii=False) + "\n")
    tmp.replace(path)
