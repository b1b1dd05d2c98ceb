"""Decode step costs under several settings, side by side: each setting of each shape is one
`scripts/bench_decode.py` process (fresh compile caches; a failed CUDA-graph capture cannot poison the others),
run `--repeat` times interleaved (A B C A B C ...), so that a slow spell of the machine falls on every setting
alike. Prints per shape the median of each row and setting, its ratio to the first setting, the spread (max -
min over the repeats, in % of the median: a gain inside the spread is no gain) and the runs that finished.

  python scripts/compare_decode.py --shapes smollm2-135m,qwen2.5-coder-1.5b,llama3.1-8b --repeat 3 \\
      --setting off= --setting "norm2=--fuse-norm 1 --norm-passes 2" --setting "norm1=--fuse-norm 1 --norm-passes 1"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

ROWS = ["target decode step (1 token)", "target verify, chain (S+1=6 tokens)", "target verify, tree (T=16 tokens)",
        "draft step, chain (1 token + lm_head + argmax)", "draft step, tree (4 tokens + lm_head + top-k)",
        "plain decoding, per token (blocks of 4)", "round, chain S=5 (one replay)",
        "round, tree S=5 topk 4 T=16 (one replay)"]


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--setting {text!r}: expected NAME=FLAGS (FLAGS may be empty)")
    return name, shlex.split(flags)


def table(shape: str, names: list[str], runs: dict[str, list[dict]]) -> str:
    """Markdown: rows x settings, the median over repeats, its ratio to the first setting, the spread."""
    lines = [f"### {shape}", "", "| step (ms) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in ROWS:
        cells, base = [], None
        for name in names:
            values = [r["rows"][row] for r in runs[name] if row in r.get("rows", {})]
            if not values:
                cells.append("no run finished" if not runs[name] else "n/a")
                continue
            med = statistics.median(values)
            if name == names[0]:
                base = med
            spread = 100 * (max(values) - min(values)) / med
            ratio = f" ({med / base:.2f}x)" if base is not None and name != names[0] else ""
            cells.append(f"{med:.3f}{ratio} ±{spread:.0f}% ({len(values)})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="smollm2-135m")
    ap.add_argument("--setting", action="append", default=[],
                    help="NAME=FLAGS for bench_decode.py (repeatable; the first is the baseline; default: off=)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="keep each run's JSON and log here (default: a temporary folder)")
    ap.add_argument("--bench", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_decode.py"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per bench_decode.py process")
    args = ap.parse_args()
    settings = [parse_setting(s) for s in args.setting] or [("off", [])]
    names = [n for n, _ in settings]
    if len(set(names)) != len(names):
        raise SystemExit(f"--setting: names repeat: {names}")
    out = args.out or tempfile.mkdtemp(prefix="compare_decode_")
    os.makedirs(out, exist_ok=True)
    for shape in args.shapes.split(","):
        runs = {n: [] for n in names}
        for rep in range(args.repeat):
            for name, flags in settings:
                stem = os.path.join(out, f"{shape}-{name}-{rep}")
                cmd = [sys.executable, args.bench, "--shape", shape, *flags, "--json", stem + ".json"]
                with open(stem + ".log", "w") as log:
                    try:
                        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
                    except subprocess.TimeoutExpired:
                        rc = "timeout"
                if rc == 0 and os.path.exists(stem + ".json"):
                    with open(stem + ".json") as f:
                        runs[name].append(json.load(f))
                print(f"{shape} {name} run {rep + 1}/{args.repeat}: rc {rc} ({stem}.log)", file=sys.stderr, flush=True)
        print(table(shape, names, runs) + "\n", flush=True)


if __name__ == "__main__":
    main()
