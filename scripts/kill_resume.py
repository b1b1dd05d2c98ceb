"""A multi-process run killed with SIGKILL and resumed: does it end with the unbroken run's losses?

Runs `specforge train --nproc N ...` three times with the same arguments: once unbroken, once killed (the whole
process group, SIGKILL) as soon as checkpoint `--kill-at` exists, and once more with `--resume`. Prints the
losses of the unbroken and the resumed run side by side, and whether they and the final draft weights are
bitwise equal.

  python scripts/kill_resume.py --nproc 4 --target /tmp/t8 --data d.jsonl --out /tmp/kr -- parallel.tp_size=2 ...
  python scripts/kill_resume.py --make-target /tmp/t8 --shape llama3.1-8b --layers 4 --tokenizer carry/tok

(`--make-target` writes a random-weight target folder of a real shape, with a given tokenizer, and stops.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from specforge.eagle3.checkpoint import step_folders


def make_target(folder: str, shape: str, layers: int, tokenizer: str) -> None:
    from specforge.model_shapes import random_target

    model = random_target(shape, "cuda" if torch.cuda.is_available() else "cpu", num_layers=layers)
    model.save_pretrained(folder)
    for f in Path(tokenizer).iterdir():
        shutil.copy(f, Path(folder) / f.name)
    print(f"wrote {folder}: {shape}, {layers} layers")


def command(args, out: Path) -> list[str]:
    return [sys.executable, "-m", "specforge", "train", "--nproc", str(args.nproc), "--target", args.target,
            f"out_dir={out}", f"data.train_path={args.data}", f"train.max_steps={args.steps}",
            "train.save_interval=1", "train.save_dtype=float32", *args.overrides]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: torchrun starts its ranks in sessions of their own, so a process-group kill
    of the launcher would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")


def result(out: Path):
    return (json.loads((out / "metrics.json").read_text())["train_losses"],
            load_file(str(out / "draft" / "model.safetensors")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-target")
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokenizer")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--target")
    ap.add_argument("--data")
    ap.add_argument("--out", default="/tmp/kill_resume")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--kill-at", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.make_target:
        return make_target(args.make_target, args.shape, args.layers, args.tokenizer)
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    whole, broken = root / "unbroken", root / "killed"
    run(command(args, whole), root / "unbroken.log")

    # The killed run: SIGKILL to the launcher and every rank at once, as a lost node would see it.
    log = open(root / "killed.log", "w")
    proc = subprocess.Popen(command(args, broken), stdout=log, stderr=subprocess.STDOUT)
    while not any(int(p.name[5:]) >= args.kill_at for p in step_folders(broken / "checkpoints")):
        if proc.poll() is not None:
            sys.exit(f"the run ended before checkpoint {args.kill_at} (see {root / 'killed.log'})")
        time.sleep(0.05)
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    time.sleep(1)
    left = sorted(p.name for p in (broken / "checkpoints").iterdir())
    print(f"killed after checkpoint {args.kill_at}; left behind: {', '.join(left)}")
    if (broken / "metrics.json").exists():
        sys.exit("the run finished before it was killed: nothing was tested")
    run(command(args, broken) + ["--resume"], root / "resumed.log")
    resumed_from = [ln for ln in (root / "resumed.log").read_text().splitlines() if "resumed from" in ln]
    at = int(resumed_from[0].split(" at step ")[1].split()[0]) if resumed_from else None
    if at is None or at >= args.steps:
        sys.exit(f"the resumed run did not resume mid-run (see {root / 'resumed.log'})")
    print(resumed_from[0])

    (la, wa), (lb, wb) = result(whole), result(broken)
    print("| step | unbroken loss | killed + resumed loss | equal |")
    print("| --- | --- | --- | --- |")
    for i, (a, b) in enumerate(zip(la, lb), 1):
        print(f"| {i} | {a!r} | {b!r} | {'yes' if a == b else 'NO'} |")
    same_w = sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) if sorted(wa) == sorted(wb) else None
    print(f"losses bitwise equal: {la == lb}; final draft weights bitwise equal: {same_w} (max |diff| {worst})")


if __name__ == "__main__":
    main()
