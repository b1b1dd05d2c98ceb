"""scripts/compare_decode.py on the CPU, with a stand-in for bench_decode.py that writes known step costs: the
medians over interleaved repeats, the ratios to the first setting, the spread, and a setting whose runs fail."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_decode.py"

STAND_IN = r'''
import argparse, json, pathlib
ap = argparse.ArgumentParser()
ap.add_argument("--shape"); ap.add_argument("--json"); ap.add_argument("--scale", type=float, default=1.0)
ap.add_argument("--fail", action="store_true")
a = ap.parse_args()
if a.fail:
    raise SystemExit(2)
count = pathlib.Path(a.json).with_name("count")  # runs so far: 1.0, 1.2, 1.1 ms, times the scale
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
ms = [1.0, 1.2, 1.1][(n // 2) % 3] * a.scale
json.dump({"rows": {"target decode step (1 token)": ms, "round, chain S=5 (one replay)": 2 * ms}}, open(a.json, "w"))
'''


def test_compare_decode_medians_ratios_and_failures(tmp_path):
    bench = tmp_path / "bench.py"
    bench.write_text(STAND_IN)
    out = subprocess.run([sys.executable, str(SCRIPT), "--bench", str(bench), "--shapes", "tiny", "--repeat", "3",
                          "--setting", "base=", "--setting", "fast=--scale 0.5", "--setting", "broken=--fail",
                          "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {line.split(" | ")[0].strip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")}
    # base ran 1.0, 1.2, 1.1 (median 1.1, spread 0.2 / 1.1 = 18%); fast half that, interleaved with base
    assert lines["target decode step (1 token)"] == \
        "| target decode step (1 token) | 1.100 ±18% (3) | 0.550 (0.50x) ±18% (3) | no run finished |"
    assert "| 2.200 ±18% (3) | 1.100 (0.50x) ±18% (3) |" in lines["round, chain S=5 (one replay)"]
    assert lines["plain decoding, per token (blocks of 4)"].count("n/a") == 2
    assert out.stderr.count("rc 2") == 3


def test_step_cost_check_reads_the_record_of_the_same_card(tmp_path, capsys):
    """bench_decode.py --check: a card's step costs are held to that card's record where one exists (an H100's
    draft prefill runs a fifth slower than an H200's with the same code), else to the first record."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT.with_name("bench_decode.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mode, step = "CUDA graphs, torch.compile", "draft prefill of accepted tokens (6)"
    path = tmp_path / "costs.json"
    path.write_text(json.dumps([{"name": "smol", "device": "H200", "mode": mode, "rows": {step: 0.084}},
                                {"name": "smol", "device": "H100", "mode": mode, "rows": {step: 0.103}},
                                {"name": "smol", "device": "H100", "mode": "eager", "rows": {step: 0.5}}]))

    def run(device, ms, name="smol"):
        code = bench.check({"name": name, "device": device, "mode": mode, "rows": {step: ms}}, str(path), 0.25)
        return code, capsys.readouterr().out

    assert run("H100", 0.123) == (0, f"check against {path} (, H100): ok\n")  # within 0.103 x 1.25 = 0.129
    code, out = run("H100", 0.130)
    assert code == 1 and "SLOWER than recorded: draft prefill of accepted tokens (6): 0.130 ms, recorded 0.103" in out
    code, out = run("A100", 0.123)  # no record of this card: the first one
    assert code == 1 and "(, H200)" in out and "recorded 0.084" in out
    code, out = run("H100", 0.1, name="other")
    assert code == 1 and "no figures recorded" in out
