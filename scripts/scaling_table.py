"""How a draft scales with data, and what each recipe knob buys, in one table (issue 14, items 7 and 8).

From one prepared file (`specforge prepare-data`), the conversations are grouped by prompt (a prompt's
answers stay together), shuffled with a seed, and split once: a fixed held-out set that every run is scored
on, and training prefixes of the sizes asked for, each prefix inside the next. Every run is a real
`specforge train` (online, the recipe plus the run's overrides) and then `specforge bench --deterministic` on
the bundled real bench prompts, chain S=5 and tree topk 4 / 16 tokens, each its own process.

A small target's draft training is bound by launches and Python, not by the GPU, so `--parallel N` runs N
of those processes at once on one GPU; the acceptance figures do not depend on it (each bench is
deterministic), the seconds do. Every stage writes its results before the next starts and a rerun skips
finished stages, so a stopped table continues where it stopped (an unfinished training resumes from its last
checkpoint).

    python scripts/scaling_table.py --config configs/recipes/smollm2-gpu.yaml --data DIR/prepared.jsonl \\
        --out DIR/table --sizes 1000,4000,16000,all \\
        --ablation "vocab 16K=target.draft.draft_vocab_size=16384" \\
        --ablation "no norm_output=target.draft.norm_output=false" --parallel 5

An ablation is `NAME=key=value[,key=value...]` and runs on the largest size, or on `--ablation-size` (one of
the sizes) when the largest is too long to repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from specforge.data.regenerate import prompt_id
from specforge.files import write_text

ROOT = Path(__file__).resolve().parent.parent
BENCHES = {"chain": ["--spec-steps", "5"], "tree": ["--spec-steps", "5", "--topk", "4", "--num-draft-tokens", "16"]}


@dataclass
class Run:
    name: str
    size: int
    overrides: list[str] = field(default_factory=list)


def split(data: Path, out: Path, sizes: list[int], eval_prompts: int, seed: int) -> tuple[Path, dict[int, Path]]:
    """Held-out file and one training file per size (prefixes of one shuffled order, whole prompts only)."""
    groups: dict[str, list[str]] = {}
    with data.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                cid = str(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError) as e:
                raise SystemExit(f"{data}:{n}: not a conversation with an 'id' field ({e})")
            groups.setdefault(prompt_id(cid), []).append(line if line.endswith("\n") else line + "\n")
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    if len(keys) <= eval_prompts:
        raise SystemExit(f"{data}: {len(keys)} prompts, not more than --eval-prompts={eval_prompts}")
    held, rest = keys[:eval_prompts], keys[eval_prompts:]
    total = sum(len(groups[k]) for k in rest)
    eval_path = out / "data" / "eval.jsonl"
    if not eval_path.exists():
        write_text(eval_path, "".join(line for k in held for line in groups[k]))
    paths = {}
    for size in sizes:
        size = min(size, total)
        path = out / "data" / f"train_{size}.jsonl"
        if not path.exists():
            lines, count = [], 0
            for k in rest:
                if count >= size:
                    break
                lines += groups[k]
                count += len(groups[k])
            write_text(path, "".join(lines))
        paths[size] = path
    return eval_path, paths


def conversations(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def run_stage(cmd: list[str], log: Path, done: Path, env: dict) -> float | None:
    """Run one process unless its output exists; returns seconds taken (None: skipped or failed)."""
    if done.exists():
        return None
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    took = time.time() - t
    if rc != 0 or not done.exists():
        print(f"  {log.parent.name}: {cmd[3]} failed (exit {rc}); see {log}", flush=True)
        return None
    return took


def do_run(run: Run, args, train_path: Path, eval_path: Path, env: dict) -> None:
    d = args.out / run.name
    base = [sys.executable, "-m", "specforge"]
    common = (["--config", args.config, f"out_dir={d}"] + ([f"--target={args.target}"] if args.target else [])
              + args.set)
    times = json.loads((d / "times.json").read_text()) if (d / "times.json").exists() else {}
    train = base + ["train"] + common + [f"data.train_path={train_path}", f"data.eval_path={eval_path}",
                                         "train.resume=latest", f"data.num_proc={args.num_proc}"] + run.overrides
    took = run_stage(train, d / "train.log", d / "metrics.json", env)
    if took is not None:
        times["train_s"] = round(took, 1)
        write_text(d / "times.json", json.dumps(times))
    if not (d / "metrics.json").exists():
        return
    print(f"  {run.name}: trained", flush=True)
    for kind in args.bench:
        bench = (base + ["bench"] + common + BENCHES[kind]
                 + ["--deterministic", "bench.baseline=false", f"bench.out={d / ('bench_' + kind)}"]
                 + [o for o in run.overrides if o.startswith("bench.")])
        took = run_stage(bench, d / f"bench_{kind}.log", d / f"bench_{kind}" / "results.json", env)
        if took is not None:
            times[f"bench_{kind}_s"] = round(took, 1)
            write_text(d / "times.json", json.dumps(times))
    print(f"  {run.name}: done", flush=True)


def row(run: Run, args, sizes: dict[int, int]) -> dict:
    d = args.out / run.name
    r = {"name": run.name, "conversations": sizes.get(run.size), "overrides": " ".join(run.overrides)}
    if (d / "metrics.json").exists():
        m = json.loads((d / "metrics.json").read_text())
        ev = m.get("eval") or {}
        r["steps"] = m.get("steps")
        r["acc"] = [ev[f"acc_{k}"] for k in range(len(ev)) if f"acc_{k}" in ev]  # every TTT step of the run
        r["chain_estimate"] = ev.get("chain_accept_len_5")
    for kind in args.bench:
        p = d / f"bench_{kind}" / "results.json"
        if p.exists():
            o = json.loads(p.read_text())["by_category"]["overall"]
            r[kind] = {"accept_length": o["accept_length"], "by_position": o["accept_rate_by_position"]}
    if (d / "times.json").exists():
        r["times"] = json.loads((d / "times.json").read_text())
    return r


def markdown(rows: list[dict], kinds: list[str]) -> str:
    head = "| run | conversations | steps | train s | held-out acc_0.. | chain estimate |"
    head += "".join(f" bench {k} |" for k in kinds)
    lines = [head, "|" + " --- |" * (6 + len(kinds))]
    for r in rows:
        acc = " ".join(f"{a:.3f}" for a in r.get("acc", []))
        est = f"{r['chain_estimate']:.2f}" if r.get("chain_estimate") else ""
        cells = [r["name"], f"{r['conversations']:,}" if r["conversations"] else "", str(r.get("steps") or ""),
                 str((r.get("times") or {}).get("train_s", "")), acc, est]
        cells += [f"{r[k]['accept_length']:.2f}" if k in r else "" for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_runs(args, sizes: list[int]) -> list[Run]:
    runs = [Run(f"size {s}" if s < max(sizes) else "largest", s) for s in sizes]
    at = max(sizes) if args.ablation_size is None else args.ablation_size
    if args.ablation and at not in sizes:
        raise SystemExit(f"--ablation-size {at}: not one of the training sizes {sizes}")
    for spec in args.ablation:
        name, _, over = spec.partition("=")
        if not over or "=" not in over:
            raise SystemExit(f"--ablation {spec!r}: write NAME=key=value[,key=value...]")
        runs.append(Run(name, at, over.split(",")))
    for r in runs:  # folder names
        r.name = r.name.replace(" ", "_").replace("/", "_")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SystemExit(f"run names repeat (spaces and / read as _): {names}")
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the recipe YAML every run starts from")
    p.add_argument("--target", default=None, help="preset name, if the recipe does not set it")
    p.add_argument("--data", required=True, type=Path, help="prepared conversations (JSONL with ids)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--sizes", default="1000,4000,16000,all",
                   help="training conversations per run ('all' = everything not held out)")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME=key=value[,key=value]")
    p.add_argument("--ablation-size", type=int, default=None, help="the size the ablations run on (one of "
                   "--sizes; default the largest)")
    p.add_argument("--eval-prompts", type=int, default=400, help="prompts held out (all their answers)")
    p.add_argument("--bench", default="chain,tree", help="benches per run: chain, tree, or none")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (they share the GPU)")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="an override for every process of every run (train and bench), e.g. device=cpu")
    p.add_argument("--only", default=None, help="comma-separated run names to do (others are only tabled)")
    p.add_argument("--table-only", action="store_true", help="print the table of what exists and stop")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.bench = [] if args.bench == "none" else args.bench.split(",")
    for k in args.bench:
        if k not in BENCHES:
            raise SystemExit(f"--bench {k!r}: choose from {', '.join(BENCHES)} or none")
    args.num_proc = max(1, (os.cpu_count() or 2) // max(1, args.parallel))
    big = 1 << 62
    asked = [big if s == "all" else int(s) for s in args.sizes.split(",")]
    eval_path, paths = split(args.data, args.out, asked, args.eval_prompts, args.seed)
    real = sorted(paths)  # sizes as cut (an asked size above the data's becomes all of it)
    runs = parse_runs(args, real)
    counts = {s: conversations(paths[s]) for s in real}
    print(f"scaling_table: {conversations(eval_path):,} held-out conversations; training sizes "
          f"{', '.join(f'{counts[s]:,}' for s in real)}; {len(runs)} runs, {args.parallel} at a time", flush=True)
    if not args.table_only:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.parallel > 1:
            # Each process would otherwise size its CPU thread pools (and inductor's compile workers) to every
            # core: on an H200's 16 cores, 6 runs so made spent minutes per step at a load of 70.
            for var in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
                env.setdefault(var, str(args.num_proc))
        todo = [r for r in runs if args.only is None or r.name in args.only.split(",")]
        # the biggest jobs first, so that the small ones fill in at the end
        todo.sort(key=lambda r: -r.size)
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            for f in [pool.submit(do_run, r, args, paths[r.size], eval_path, env) for r in todo]:
                f.result()
    rows = [row(r, args, counts) for r in runs]
    table = markdown(rows, args.bench)
    write_text(args.out / "table.md", table + "\n")
    write_text(args.out / "table.json", json.dumps(rows, indent=2))
    print(table)


if __name__ == "__main__":
    main()
