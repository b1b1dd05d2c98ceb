"""scripts/compare_upstream.py on the CPU with the tiny shape: our side for real (its losses are finite and fall,
the JSON carries what the table shows); upstream's side only where an upstream SpecForge tree was exported to
upstream/SpecForge (CI has none)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO / "upstream" / "SpecForge"
spec = importlib.util.spec_from_file_location("compare_upstream", REPO / "scripts" / "compare_upstream.py")
compare_upstream = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_upstream)

TINY_RUN = ["--shape", "tiny", "--device", "cpu", "--seq", "64", "--steps", "3", "--warmup", "1", "--lr", "1e-3"]
FIELDS = ("tokens_per_s", "step_ms", "phase_ms", "peak_mem_gib", "params", "losses", "step0_losses", "package",
          "attention", "versions")


def _run(tmp_path, capsys, *extra):
    out = tmp_path / "compare.json"
    code = compare_upstream.main([*TINY_RUN, *extra, "--out", str(out)])
    table = capsys.readouterr().out
    return code, json.loads(out.read_text()), table


def _check_side(r, package: Path):
    assert r["ok"], r.get("error")
    for key in FIELDS:
        assert key in r, key
    assert set(r["phase_ms"]) == {"labels", "draft_fwd", "backward", "optimizer"}
    assert all(v >= 0 for v in r["phase_ms"].values())
    assert r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0
    assert Path(r["package"]) == package.resolve()
    losses = r["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses + r["step0_losses"])
    assert losses[-1] < losses[0], losses  # the same batch four times: the draft learns it
    assert r["step0_losses"][-1] < r["step0_losses"][0]


def test_ours_tiny_cpu(tmp_path, capsys):
    code, res, table = _run(tmp_path, capsys, "--only", "ours")
    assert code == 0
    assert res["spec"]["shape"] == "tiny" and res["spec"]["ttt"] == 7
    assert list(res["sides"]) == ["ours"]
    r = res["sides"]["ours"]
    _check_side(r, REPO / "specforge")
    assert r["attention"] == "reference"
    t = compare_upstream.TINY
    h, i, vd = t["hidden_size"], t["intermediate_size"], t["draft_vocab_size"]
    q = t["num_attention_heads"] * t["head_dim"]
    kv = t["num_key_value_heads"] * t["head_dim"]
    # fc, q/k/v (read 2H), o, the MLP, three layer norms, the final norm, lm_head
    assert r["params"] == 3 * h * h + 2 * h * (q + 2 * kv) + q * h + 3 * h * i + 3 * h + h + h * vd
    assert "| tokens/s |" in table and "| ours |" in table


@pytest.mark.skipif(not (UPSTREAM / "specforge").is_dir(), reason="no upstream SpecForge tree in upstream/SpecForge")
def test_upstream_tiny_cpu(tmp_path, capsys, monkeypatch):
    # Upstream compiles its norms, rope and teacher with torch.compile; eager keeps this under 30 s on 2 cores.
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    code, res, _table = _run(tmp_path, capsys, "--only", "upstream", "--upstream", str(UPSTREAM))
    assert code == 0, res["sides"]["upstream"].get("error")
    r = res["sides"]["upstream"]
    _check_side(r, UPSTREAM / "specforge")
    assert r["attention"] == "sdpa"  # its flex backend has no CPU backward
    assert any("_compute_loss" in n for n in r["notes"])


# ------------------------------------------------------------------- acceptance mode (--data / --features)
def _features_run(tmp_path, capsys, folder, *extra):
    from tests.test_train import write_conversations

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_conversations(tmp_path / "prepared.jsonl", n=12)
    out = tmp_path / "acc.json"
    code = compare_upstream.main([
        "--features", str(tmp_path / "feats.pt"), "--data", str(data), "--target", str(folder), "--eval-every", "4",
        "--device", "cpu", "--batch", "3", "--epochs", "2", "--lr", "3e-3", "--ttt", "3",
        "--ours", "target.draft.draft_vocab_size=256", *extra, "--out", str(out)])
    return code, json.loads(out.read_text()), capsys.readouterr().out


def _check_acc_side(r, package: Path):
    assert r["ok"], r.get("error")
    for key in ("epochs", "steps", "final_loss", "losses", "acc", "chain_accept_len_5", "tokens_per_s", "package",
                "attention", "versions", "acc_source"):
        assert key in r, key
    assert Path(r["package"]) == package.resolve()
    assert r["epochs"] == 2 and r["steps"] == 6 == len(r["losses"])  # 9 train conversations in batches of 3
    assert len(r["acc"]) == 3 and all(0.0 <= a <= 1.0 for a in r["acc"])
    assert 1.0 <= r["chain_accept_len_5"] <= 6.0 and math.isfinite(r["final_loss"]) and r["tokens_per_s"] > 0


def test_features_ours_tiny_cpu(tmp_path, capsys, tiny_target_folder):
    code, res, table = _features_run(tmp_path, capsys, tiny_target_folder, "--only", "ours")
    assert code == 0
    s = res["spec"]
    assert (s["train_conversations"], s["eval_conversations"], s["train_batches"]) == (9, 3, 3)
    assert s["draft_vocab_size"] == 256 and s["epochs"] == 2 and s["lr"] == 3e-3 and s["clip"] == 0.5
    _check_acc_side(res["sides"]["ours"], REPO / "specforge")
    assert "| side | epochs | steps | final train loss | acc_0 | acc_1 | acc_2 | chain est. (5) | tokens/s |" in table
    assert "| ours | 2 | 6 |" in table
    # The written features are reused without --data: the same batches, the same result on the CPU.
    out2 = tmp_path / "again.json"
    assert compare_upstream.main(["--features", str(tmp_path / "feats.pt"), "--only", "ours", "--epochs", "2",
                                  "--lr", "3e-3", "--ttt", "3", "--ours", "target.draft.draft_vocab_size=256",
                                  "--out", str(out2)]) == 0
    again = json.loads(out2.read_text())["sides"]["ours"]
    assert again["acc"] == res["sides"]["ours"]["acc"] and again["losses"] == res["sides"]["ours"]["losses"]


def test_online_featurizer_is_feature_capture(tiny_target_folder):
    """--online's features (plain transformers, run inside each side's process) are bit for bit those our
    FeatureCapture gives on the target `load_target` loads, padded rows included."""
    import torch

    from specforge.config import load_config
    from specforge.targets import FeatureCapture, load_target

    cfg = load_config(str(tiny_target_folder))
    model, _ = load_target(cfg.target, torch.device("cpu"))
    aux = [0, 1, 2]
    spec = {"target_folder": str(tiny_target_folder), "target_dtype": str(model.dtype).removeprefix("torch."),
            "aux_layer_ids": aux}
    featurize = compare_upstream.online_featurizer(spec, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=g)
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 31:] = 0  # a padded row
    f = FeatureCapture(model, aux).run(ids, mask)
    got = featurize({"input_ids": ids, "attention_mask": mask, "loss_mask": mask.bool()})
    assert got["aux"].dtype == got["final"].dtype == torch.bfloat16
    assert torch.equal(got["aux"], f.aux.to(torch.bfloat16)) and torch.equal(got["final"], f.final.to(torch.bfloat16))
    assert torch.equal(got["input_ids"], ids)


def test_online_trains_as_stored_features_tiny_cpu(tmp_path, capsys, tiny_target_folder):
    """--online writes the token batches only (no features) and our side, running the target per batch,
    trains and evaluates to the very losses and accuracies of the run on the stored features."""
    import torch

    code, stored, _ = _features_run(tmp_path / "stored", capsys, tiny_target_folder, "--only", "ours")
    assert code == 0
    code, online, table = _features_run(tmp_path / "online", capsys, tiny_target_folder, "--only", "ours", "--online")
    assert code == 0, online["sides"]["ours"].get("error")
    assert online["spec"]["online"] and not stored["spec"]["online"]
    batches = torch.load(tmp_path / "online" / "feats.pt", weights_only=True)["train"]
    assert all(set(b) == set(compare_upstream.TOKEN_KEYS) for b in batches)
    a, b = stored["sides"]["ours"], online["sides"]["ours"]
    assert a["losses"] == b["losses"] and a["acc"] == b["acc"]
    assert "--online" in table and "| ours | 2 | 6 |" in table


def test_online_batches_reused_and_runs_merged(tmp_path, capsys, tiny_target_folder):
    """The token batches --online wrote are reused without --data (so a second side can start from them beside
    the first), to the same losses; --merge prints one table from the runs' --out files and refuses files of
    another spec or a side twice. The file is written under a temporary name and renamed."""
    code, first, _ = _features_run(tmp_path, capsys, tiny_target_folder, "--only", "ours", "--online")
    assert code == 0 and not (tmp_path / "feats.pt.tmp").exists()
    again = tmp_path / "again.json"
    assert compare_upstream.main(["--features", str(tmp_path / "feats.pt"), "--only", "ours", "--online",
                                  "--epochs", "2", "--lr", "3e-3", "--ttt", "3", "--ours",
                                  "target.draft.draft_vocab_size=256", "--out", str(again)]) == 0
    capsys.readouterr()
    reused = json.loads(again.read_text())
    assert reused["sides"]["ours"]["losses"] == first["sides"]["ours"]["losses"]
    assert reused["spec"] == first["spec"]
    merged = tmp_path / "merged.json"
    assert compare_upstream.main(["--merge", str(tmp_path / "acc.json"), "--out", str(merged)]) == 0
    assert "| ours | 2 | 6 |" in capsys.readouterr().out
    assert json.loads(merged.read_text())["sides"] == first["sides"]
    with pytest.raises(SystemExit, match="more than one file"):
        compare_upstream.main(["--merge", str(tmp_path / "acc.json"), str(again)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(first, spec=dict(first["spec"], lr=1.0), sides={"upstream": {"ok": True}})))
    with pytest.raises(SystemExit, match="differs in: lr"):
        compare_upstream.main(["--merge", str(tmp_path / "acc.json"), str(other)])


@pytest.mark.skipif(not (UPSTREAM / "specforge").is_dir(), reason="no upstream SpecForge tree in upstream/SpecForge")
def test_features_upstream_tiny_cpu(tmp_path, capsys, monkeypatch, tiny_target_folder):
    """Upstream's side on stored features, then with --online (the target run in its own process, beside its
    specforge package): the same losses and accuracies."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    runs = []
    for name, extra in (("stored", []), ("online", ["--online"])):
        code, res, table = _features_run(tmp_path / name, capsys, tiny_target_folder, "--only", "upstream",
                                         "--upstream", str(UPSTREAM), *extra)
        r = res["sides"]["upstream"]
        assert code == 0, r.get("error")
        _check_acc_side(r, UPSTREAM / "specforge")
        assert len(r["upstream_own_acc"]) == 3 and all(0.0 <= a <= 1.0 for a in r["upstream_own_acc"])
        assert sum(r["eval_positions"]) > 0
        assert "| upstream | 2 | 6 |" in table
        runs.append(r)
    assert runs[0]["losses"] == runs[1]["losses"] and runs[0]["acc"] == runs[1]["acc"]


def test_acc_from_logits_is_our_definition():
    """The accuracy the harness computes from upstream's draft logits equals the statistics of our ttt_loss on
    the same draft, tokens, features and mask (the draft's own logits here)."""
    import torch

    from specforge.eagle3.ttt import next_token_mask, soft_labels, ttt_loss, ttt_unroll
    from tests.conftest import unroll_inputs

    draft, ids, aux = unroll_inputs(2, 24)
    g = torch.Generator().manual_seed(3)
    h, v = draft.config.hidden_size, draft.config.vocab_size
    final = torch.randn(2, 24, h, generator=g, dtype=torch.float64)
    lm_head = torch.randn(v, h, generator=g, dtype=torch.float64)
    lm_head[draft.t2d] *= 3.0  # the target's argmax lands in the draft vocab
    loss_mask = torch.rand(2, 24, generator=g) > 0.3
    draft_ids = torch.arange(draft.d2t.numel()) + draft.d2t
    labels = soft_labels(final, lm_head, draft_ids, next_token_mask(loss_mask))
    with torch.no_grad():
        _, stats = ttt_loss(draft, ids, loss_mask, aux, labels, steps=4, fused=False, attention="reference")
        steps = [draft.logits(hidden) for _, hidden in ttt_unroll(draft, ids, aux, 4, attention="reference")]
    for k, logits in enumerate(steps):
        got = compare_upstream.acc_from_logits(logits, final, lm_head, loss_mask, draft.d2t, k)
        assert got == (int(stats[k].correct), int(stats[k].count)), k
    assert sum(int(s.count) for s in stats) > 0 and sum(int(s.correct) for s in stats) > 0


def test_side_env_makes_pythonpath_absolute(monkeypatch, tmp_path):
    """A side runs in a temporary folder: `PYTHONPATH=.` (a GPU machine without an install) must still name the
    folder the parent was started from, or the side cannot import our package."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", f".{os.pathsep}{tmp_path}")
    assert compare_upstream.side_env()["PYTHONPATH"].split(os.pathsep) == [str(REPO), str(tmp_path)]
    monkeypatch.delenv("PYTHONPATH")
    assert "PYTHONPATH" not in compare_upstream.side_env()

