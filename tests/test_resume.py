"""Reliability of training: exact resume (in process and after kill -9), kept checkpoints, non-finite steps,
run-to-run reproducibility."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from specforge.config import load_config
from specforge.dump import dump_hidden
from specforge.eagle3.checkpoint import load_draft, step_folders
from specforge.eagle3.train import train

from .conftest import tiny_target
from .test_train import write_conversations

STEPS = 9  # 12 training conversations in batches of 2: the run crosses an epoch boundary at step 6
DEFER = "train.defer_reads=true"  # the GPU default, here with fused AdamW on the CPU


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("data") / "d.jsonl", n=14)


@pytest.fixture(scope="module")
def dump(tmp_path_factory, tiny_target_folder, data):
    out = tmp_path_factory.mktemp("dump")
    dump_hidden(_cfg(tiny_target_folder, data, out / "x", f"dump.out={out / 'h'}", "dump.dtype=float32",
                     "dump.shard_tokens=150", "dump.batch_size=3"))
    return out / "h"


def _cfg(folder, data, out, *extra):
    return load_config(str(folder), overrides=[
        f"out_dir={out}", f"data.train_path={data}", "data.eval_every=5", "train.batch_size=2",
        f"train.max_steps={STEPS}", "train.ttt_length=3", "train.lr=3e-3", "train.warmup_steps=2",
        "train.save_dtype=float32", "target.draft.draft_vocab_size=512", *extra])


def _mode(mode, dump):
    """online: the features computed once and kept (on the CPU, when a run passes over its data more than
    once; train.cache_features); online-live: the target run in every step; offline: read from a dump."""
    return {"online": [], "online-live": ["train.cache_features=false"],
            "offline": ["train.mode=offline", f"train.hidden={dump}", "train.shuffle_window=2"]}[mode]


def _result(out):
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["train_losses"], load_file(str(out / "draft" / "model.safetensors"))


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tiny_target_folder, data, dump):
    runs = {}
    for mode in ("online", "online-live", "offline"):
        out = tmp_path_factory.mktemp(f"unbroken-{mode}")
        train(_cfg(tiny_target_folder, data, out, *_mode(mode, dump)))
        runs[mode] = _result(out)
    return runs


def _assert_same(got, want):
    assert got[0] == want[0]  # bitwise: the losses as Python floats
    assert sorted(got[1]) == sorted(want[1])
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k


@pytest.mark.parametrize("mode,stop", [("online", 4), ("online", 6), ("online-live", 4), ("offline", 5)])
def test_stop_and_resume_equals_unbroken(tmp_path, tiny_target_folder, data, dump, unbroken, mode, stop):
    """Stopped mid-epoch (4, 5) or at the epoch boundary (6), then resumed: the same losses and weights, bit
    for bit, as the run that never stopped (weights, AdamW moments, schedule, data position, RNG)."""
    out = tmp_path / "run"
    train(_cfg(tiny_target_folder, data, out, *_mode(mode, dump), f"train.stop_after={stop}"))
    assert not (out / "metrics.json").exists()
    assert [p.name for p in step_folders(out / "checkpoints")] == [f"step_{stop:07d}"]
    train(_cfg(tiny_target_folder, data, out, *_mode(mode, dump), "train.resume=latest"))
    _assert_same(_result(out), unbroken[mode])


def test_kept_features_train_as_live_ones(unbroken):
    """Features computed once per sample alone (kept) and per padded batch (live) differ only in float32
    rounding: the same run to within it."""
    kept, live = unbroken["online"], unbroken["online-live"]
    torch.testing.assert_close(torch.tensor(kept[0]), torch.tensor(live[0]), rtol=1e-4, atol=0)
    for k in live[1]:
        torch.testing.assert_close(kept[1][k], live[1][k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("cache, forwards", [("true", 14), ("false", STEPS + 1)])
def test_kept_features_run_the_target_once_per_sample(tmp_path, tiny_target_folder, data, monkeypatch, cache,
                                                       forwards):
    """Kept: one target forward per conversation (12 training, 2 held out), none in the steps; live: one per
    step and one for the held-out evaluation at the end."""
    from specforge.targets import FeatureCapture

    calls = []
    run = FeatureCapture.run
    monkeypatch.setattr(FeatureCapture, "run", lambda self, ids, *a, **k: calls.append(ids.shape) or run(self, ids,
                                                                                                          *a, **k))
    train(_cfg(tiny_target_folder, data, tmp_path / "run", f"train.cache_features={cache}"))
    assert len(calls) == forwards
    if cache == "true":
        assert all(shape[0] == 1 for shape in calls)


def test_two_runs_give_identical_losses(tmp_path, tiny_target_folder, data, unbroken):
    train(_cfg(tiny_target_folder, data, tmp_path / "again"))
    _assert_same(_result(tmp_path / "again"), unbroken["online"])


def test_resume_refuses_other_settings(tmp_path, tiny_target_folder, data):
    out = tmp_path / "run"
    train(_cfg(tiny_target_folder, data, out, "train.stop_after=2"))
    with pytest.raises(SystemExit, match="saved by a run of 9 steps, this one has 12"):
        train(_cfg(tiny_target_folder, data, out, "train.resume=latest", "train.max_steps=12"))
    with pytest.raises(SystemExit, match="not a training checkpoint"):
        train(_cfg(tiny_target_folder, data, out, f"train.resume={tmp_path}"))


def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path, tiny_target_folder, data, unbroken):
    """kill -9 while checkpoints are being written every step; the same command with --resume finishes with
    the unbroken run's numbers. A half-written checkpoint of a killed save is never taken for one."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "specforge", "train", "--target", str(tiny_target_folder), f"out_dir={out}",
           f"data.train_path={data}", "data.eval_every=5", "train.batch_size=2", f"train.max_steps={STEPS}",
           "train.ttt_length=3", "train.lr=3e-3", "train.warmup_steps=2", "train.save_dtype=float32",
           "target.draft.draft_vocab_size=512", "train.save_interval=1", "train.keep_checkpoints=2"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not any(int(p.name[5:]) >= 3 for p in step_folders(out / "checkpoints")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run ended before it could be killed"
    # What a save killed half-way leaves: a temporary folder with a partial file, and no train state.
    partial = out / "checkpoints" / f"step_{STEPS - 1:07d}.tmp"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    run = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resumed from" in run.stdout
    _assert_same(_result(out), unbroken["online"])
    kept = [p.name for p in (out / "checkpoints").iterdir()]
    assert sorted(kept) == [f"step_{STEPS - 1:07d}", f"step_{STEPS:07d}"]  # the newest 2, no leftovers


@pytest.fixture(scope="module")
def nan_target_folder(tmp_path_factory, smol_tokenizer):
    """A target whose embedding row of one token (' fox') is NaN, as a corrupted checkpoint would have:
    every batch holding that token gives a non-finite loss, the others are fine."""
    folder = tmp_path_factory.mktemp("nan-target")
    model = tiny_target(vocab_size=len(smol_tokenizer), initializer_range=0.5)
    fox = smol_tokenizer(" fox", add_special_tokens=False)["input_ids"]
    assert len(fox) == 1
    with torch.no_grad():
        model.model.embed_tokens.weight[fox[0]] = float("nan")
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra", [[], [DEFER]], ids=["host", "deferred"])
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, nan_target_folder, data, extra):
    out = tmp_path / "run"
    # 14 conversations, 2 about "a red fox", no held-out split, 7 batches of 2: one epoch.
    train(load_config(str(nan_target_folder), overrides=[
        f"out_dir={out}", f"data.train_path={data}", "data.eval_every=0", "train.batch_size=2",
        "train.max_steps=7", "train.ttt_length=2", "target.draft.draft_vocab_size=512", *extra]))
    metrics = json.loads((out / "metrics.json").read_text())
    bad = [x for x in metrics["train_losses"] if x != x]
    assert metrics["nonfinite_steps"] == len(bad) and 1 <= len(bad) <= 2
    weights = load_file(str(out / "draft" / "model.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def stop_after_three_nonfinite(tmp_path, nan_target_folder, *extra):
    """Train on the NaN target until train.max_nonfinite=3 stops the run (a clear SystemExit); returns its one
    checkpoint folder. Also run on a GPU by tests/test_train_gpu.py."""
    with open(tmp_path / "fox.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Fox {i}?"},
                                             {"role": "assistant", "content": "A red fox runs."}]}) + "\n")
    out = tmp_path / "run"
    cfg = load_config(str(nan_target_folder), overrides=[
        f"out_dir={out}", f"data.train_path={tmp_path / 'fox.jsonl'}", "data.eval_every=0", "train.batch_size=2",
        "train.max_steps=20", "train.ttt_length=2", "train.max_nonfinite=3", "target.draft.draft_vocab_size=512",
        *extra])
    with pytest.raises(SystemExit, match=r"3 non-finite steps in a row \(up to step 3\).*last good weights are in"):
        train(cfg)
    (ckpt,) = step_folders(out / "checkpoints")
    return ckpt


@pytest.mark.parametrize("extra,saved", [([], 3), ([DEFER], 4)], ids=["host", "deferred"])
def test_repeated_nonfinite_steps_stop_with_a_loadable_checkpoint(tmp_path, nan_target_folder, extra, saved):
    """Three non-finite steps in a row stop the run with a checkpoint of finite weights: at step 3 where the
    host decides each step, at step 4 where it learns of step 3 after queueing step 4."""
    ckpt = stop_after_three_nonfinite(tmp_path, nan_target_folder, *extra)
    assert ckpt.name == f"step_{saved:07d}"
    draft = load_draft(ckpt)
    assert all(torch.isfinite(p).all() for p in draft.parameters())


def test_deferred_reads_resume_bitwise_and_train_as_the_host_path(tmp_path, tiny_target_folder, data, unbroken):
    """Host reads one step late, updates skipped on the device where non-finite (fused AdamW's found_inf): a
    run stopped at the epoch boundary and resumed equals the unbroken deferred run bit for bit, and both
    train as the host-decided path does to within fused AdamW's roundings."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(_cfg(tiny_target_folder, data, whole, DEFER))
    train(_cfg(tiny_target_folder, data, part, DEFER, "train.stop_after=6"))
    train(_cfg(tiny_target_folder, data, part, DEFER, "train.resume=latest"))
    deferred = _result(whole)
    _assert_same(_result(part), deferred)
    host = unbroken["online"]
    assert len(deferred[0]) == len(host[0]) == STEPS
    torch.testing.assert_close(torch.tensor(deferred[0]), torch.tensor(host[0]), rtol=1e-5, atol=0)
    for k in host[1]:
        torch.testing.assert_close(deferred[1][k], host[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_deterministic_switch_on_the_cpu_changes_no_bit(tmp_path, tiny_target_folder, data, unbroken):
    """The CPU is deterministic already; the switch's norm kernels fall back to the very formula, so a run
    with it on gives the run without it, bit for bit. (Its effect on a GPU: tests/test_kernels_invariant.py.)"""
    from specforge.eagle3.train import set_deterministic

    try:
        train(_cfg(tiny_target_folder, data, tmp_path / "det", "train.deterministic=true"))
    finally:
        set_deterministic(False)
    _assert_same(_result(tmp_path / "det"), unbroken["online"])
    for key in ("compile", "compile_target"):
        with pytest.raises(SystemExit, match=f"train.deterministic and train.{key}:"):
            train(_cfg(tiny_target_folder, data, tmp_path / "x", "train.deterministic=true", f"train.{key}=true"))


def test_prune_killed_mid_removal_leaves_nothing_behind(tmp_path, monkeypatch):
    """A kill while an old checkpoint is being deleted (files gone one by one, the train state among the first)
    must not leave a folder that no later prune sees."""
    from specforge.eagle3 import checkpoint as ck
    for step in (1, 2, 3):
        folder = tmp_path / f"step_{step:07d}"
        folder.mkdir()
        (folder / ck.TRAIN_STATE).write_bytes(b"x")
        (folder / "model.safetensors").write_bytes(b"x")
    real_rmtree = ck.shutil.rmtree

    def killed(path, *a, **k):  # deletes the train state, then the process dies
        (path / ck.TRAIN_STATE).unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.prune_checkpoints(tmp_path, keep=2)
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    ck.prune_checkpoints(tmp_path, keep=2)  # the next save's prune
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003"]
