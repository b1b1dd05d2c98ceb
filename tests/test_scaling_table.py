"""scripts/scaling_table.py: the split every run of a scaling table shares (one held-out set, nested training
prefixes of whole prompts), its rerun, its errors, and the table it prints from the runs' own output files."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("scaling_table", ROOT / "scripts" / "scaling_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up while it is made
    spec.loader.exec_module(mod)
    return mod


def prepared(path: Path, prompts: int = 30, samples: int = 2) -> Path:
    with path.open("w") as f:
        for i in range(prompts):
            for k in range(samples):
                cid = f"p{i}" if k == 0 else f"p{i}#{k}"
                f.write(json.dumps({"id": cid, "messages": [{"role": "user", "content": f"q{i}"},
                                                            {"role": "assistant", "content": f"a{i}.{k}"}]}) + "\n")
    return path


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_split_holds_out_whole_prompts_and_nests_the_sizes(tmp_path):
    st = load_script()
    data = prepared(tmp_path / "prepared.jsonl")
    eval_path, paths = st.split(data, tmp_path / "out", [10, 21, 1 << 62], eval_prompts=5, seed=0)
    held = ids(eval_path)
    assert len(held) == 10  # 5 prompts, both answers of each
    assert {h.split("#")[0] for h in held} == {h for h in held if "#" not in h}
    assert sorted(paths) == [10, 21, 50]  # 'all' is cut to the 50 conversations not held out
    small, mid, full = (ids(paths[s]) for s in (10, 21, 50))
    assert len(small) == 10 and len(mid) == 22 and len(full) == 50  # whole prompts: 21 rounds up to 22
    assert full[:len(mid)] == mid and mid[:len(small)] == small  # each size a prefix of the next
    assert not set(full) & set(held)
    assert sorted(full + held) == sorted(ids(data))
    for part in (small, mid, full):  # a prompt's answers travel together
        assert all((c.split("#")[0] in part) and (c.split("#")[0] + "#1" in part) for c in part)
    # the same seed gives the same split; a rerun keeps the files it finds
    again_eval, again = st.split(data, tmp_path / "again", [10, 21, 1 << 62], eval_prompts=5, seed=0)
    assert ids(again_eval) == held and ids(again[21]) == mid
    other_eval, _ = st.split(data, tmp_path / "other", [10], eval_prompts=5, seed=1)
    assert ids(other_eval) != held
    mtime = paths[10].stat().st_mtime_ns
    st.split(data, tmp_path / "out", [10], eval_prompts=5, seed=0)
    assert paths[10].stat().st_mtime_ns == mtime


def test_split_errors_name_the_file(tmp_path):
    st = load_script()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "messages": []}) + "\n" + '{"messages": []}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not a conversation with an 'id' field"):
        st.split(bad, tmp_path / "out", [1], eval_prompts=0, seed=0)
    data = prepared(tmp_path / "p.jsonl", prompts=3)
    with pytest.raises(SystemExit, match="3 prompts, not more than --eval-prompts=3"):
        st.split(data, tmp_path / "out2", [1], eval_prompts=3, seed=0)


def test_table_reads_the_runs_outputs(tmp_path):
    st = load_script()

    class Args:
        out = tmp_path
        bench = ["chain", "tree"]
        ablation = ["nout=target.draft.norm_output=true,train.lr=2e-3"]
        ablation_size = None

    runs = st.parse_runs(Args, [100, 400])
    assert [(r.name, r.size, r.overrides) for r in runs] == [
        ("size_100", 100, []), ("largest", 400, []), ("nout", 400, ["target.draft.norm_output=true", "train.lr=2e-3"])]
    d = tmp_path / "largest"
    (d / "bench_chain").mkdir(parents=True)
    acc = [0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1]
    (d / "metrics.json").write_text(json.dumps({"steps": 12, "eval": {**{f"acc_{k}": a for k, a in enumerate(acc)},
                                                                      "chain_accept_len_5": 1.7032}}))
    (d / "times.json").write_text(json.dumps({"train_s": 3.5}))
    (d / "bench_chain" / "results.json").write_text(json.dumps(
        {"by_category": {"overall": {"accept_length": 1.655, "accept_rate_by_position": [0.4, 0.2]}}}))
    rows = [st.row(r, Args, {100: 100, 400: 398}) for r in runs]
    assert rows[1]["acc"] == acc and rows[1]["chain"]["accept_length"] == 1.655 and "tree" not in rows[1]
    lines = st.markdown(rows, Args.bench).splitlines()
    assert lines[3] == "| largest | 398 | 12 | 3.5 | 0.500 0.400 0.300 0.200 0.100 0.100 0.100 | 1.70 | 1.66 |  |"
    assert lines[2] == "| size_100 | 100 |  |  |  |  |  |  |"
    # a run with more TTT steps tables all of them
    (d / "metrics.json").write_text(json.dumps({"steps": 12, "eval": {f"acc_{k}": 0.5 for k in range(9)}}))
    assert st.row(runs[1], Args, {400: 398})["acc"] == [0.5] * 9
    with pytest.raises(SystemExit, match="NAME=key=value"):
        Args.ablation = ["no-overrides"]
        st.parse_runs(Args, [100])
    with pytest.raises(SystemExit, match="run names repeat"):  # the folders would be the same
        Args.ablation = ["lr 2=train.lr=2e-3", "lr_2=train.lr=3e-3"]
        st.parse_runs(Args, [100])
    Args.ablation, Args.ablation_size = ["tv=train.tv_weight=1"], 100  # ablations on a smaller size
    assert [(r.name, r.size) for r in st.parse_runs(Args, [100, 400])] == [
        ("size_100", 100), ("largest", 400), ("tv", 100)]
    with pytest.raises(SystemExit, match="ablation-size 200"):
        Args.ablation_size = 200
        st.parse_runs(Args, [100, 400])
