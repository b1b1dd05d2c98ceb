"""scripts/compare_upstream.py on the CPU with the tiny shape: our side for real (its losses are finite and fall,
the JSON carries what the table shows); upstream's side only where an upstream SpecForge tree was exported to
upstream/SpecForge (CI has none)."""

from __future__ import annotations

import importlib.util
import json
import math
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
