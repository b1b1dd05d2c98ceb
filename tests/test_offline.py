"""Offline mode: dump-hidden, training from shards, resumable dumps, checksums, refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from specforge.cli import main
from specforge.config import load_config
from specforge.dump import dump_hidden
from specforge.eagle3.train import train

from .conftest import tiny_target
from .test_train import write_conversations


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("data") / "d.jsonl", n=14)


def _cfg(folder, data, out, *extra):
    return load_config(str(folder), overrides=[f"out_dir={out}", f"data.train_path={data}", "data.eval_every=5",
                                               "train.batch_size=2", "train.max_steps=6", "train.ttt_length=3",
                                               "target.draft.draft_vocab_size=512", *extra])


def test_online_and_offline_training_give_the_same_losses(tmp_path, tiny_target_folder, data):
    train(_cfg(tiny_target_folder, data, tmp_path / "online"))
    dump = tmp_path / "dump"
    dump_hidden(_cfg(tiny_target_folder, data, tmp_path / "x", f"dump.out={dump}", "dump.dtype=float32",
                     "dump.shard_tokens=200", "dump.batch_size=3"))
    train(_cfg(tiny_target_folder, data, tmp_path / "offline", "train.mode=offline", f"train.hidden={dump}",
               "train.shuffle_window=100"))
    on = json.loads((tmp_path / "online" / "metrics.json").read_text())
    off = json.loads((tmp_path / "offline" / "metrics.json").read_text())
    assert len(on["train_losses"]) == len(off["train_losses"]) == 6
    torch.testing.assert_close(torch.tensor(off["train_losses"]), torch.tensor(on["train_losses"]),
                               rtol=1e-5, atol=1e-5)
    for key in ("loss_0", "acc_0", "acc_2"):
        assert abs(on["eval"][key] - off["eval"][key]) < 1e-4
    # Both runs built the same draft vocabulary, and so does `build-vocab` from the dump.
    online_d2t = load_file(str(tmp_path / "online" / "vocab.safetensors"))["d2t"]
    assert torch.equal(online_d2t, load_file(str(tmp_path / "offline" / "vocab.safetensors"))["d2t"])
    main(["build-vocab", "--target", str(tiny_target_folder), f"out_dir={tmp_path / 'v'}", f"data.train_path={data}",
          "data.eval_every=5", "target.draft.draft_vocab_size=512", "train.mode=offline", f"train.hidden={dump}"])
    assert torch.equal(online_d2t, load_file(str(tmp_path / "v" / "vocab.safetensors"))["d2t"])


def test_small_window_streams_every_sample_once(tmp_path, tiny_target_folder, data):
    """With a window smaller than the dump, an epoch still visits each training sample exactly once."""
    from specforge.data.shards import load_manifest
    from specforge.data.sources import ShardSource

    dump = tmp_path / "dump"
    dump_hidden(_cfg(tiny_target_folder, data, tmp_path / "x", f"dump.out={dump}", "dump.shard_tokens=150"))
    cfg = _cfg(tiny_target_folder, data, tmp_path / "y", "train.shuffle_window=2")
    src = ShardSource(cfg, dump, load_manifest(dump), window=2, pad_id=0)
    seen = sorted(tuple(row[row != 0].tolist()) for b in src.train_batches(0) for row in b.input_ids)
    assert len(seen) == 14 - 2 == sum(src.counts)  # 2 of 14 held out (every 5th)
    assert sum(1 for _ in src.train_batches(0)) == src.steps_per_epoch()
    assert [b.input_ids.shape for b in src.train_batches(1)] != [b.input_ids.shape for b in src.train_batches(0)] \
        or src._order(0) != src._order(1)


def _shards(folder):
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("shard_*.safetensors"))}


def test_killed_dump_resumes_to_the_same_result(tmp_path, tiny_target_folder, data):
    args = ["dump-hidden", "--target", str(tiny_target_folder), "--data", str(data), "dump.shard_tokens=1",
            "dump.batch_size=1", f"out_dir={tmp_path / 'x'}"]
    main(args + ["--out", str(tmp_path / "straight")])
    straight = _shards(tmp_path / "straight")
    assert len(straight) == 14
    # A real kill -9 in the middle of the dump, then the same command again.
    resumed = tmp_path / "resumed"
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, "-m", "specforge", *args, "--out", str(resumed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (resumed / "shard_00002.safetensors").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(list(resumed.glob("shard_*.safetensors")))
    # Whatever the kill left, plus a half-written shard as a kill during a write leaves it.
    (resumed / "shard_00013.safetensors.tmp").write_bytes(b"partial")
    main(args + ["--out", str(resumed)])
    again = _shards(resumed)
    assert not list(resumed.glob("*.tmp"))
    assert again.keys() == straight.keys()
    for name in straight:
        for key in straight[name]:
            assert torch.equal(again[name][key], straight[name][key]), (name, key, killed_at)
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_tokens"] == sum(s["tokens"] for s in manifest["shards"])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_is_named(tmp_path, tiny_target_folder, data, damage):
    dump = tmp_path / "dump"
    dump_hidden(_cfg(tiny_target_folder, data, tmp_path / "x", f"dump.out={dump}", "dump.shard_tokens=250"))
    shard = dump / "shard_00001.safetensors"
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        raw = raw[:-100]
    else:
        raw[-50] ^= 0x01  # one bit of one feature value
    shard.write_bytes(bytes(raw))
    with pytest.raises(SystemExit) as e:
        train(_cfg(tiny_target_folder, data, tmp_path / "t", "train.mode=offline", f"train.hidden={dump}"))
    assert str(shard) in str(e.value) and "checksum" in str(e.value)


def test_dump_of_another_target_is_refused(tmp_path, tiny_target_folder, data, smol_tokenizer):
    dump = tmp_path / "dump"
    dump_hidden(_cfg(tiny_target_folder, data, tmp_path / "x", f"dump.out={dump}"))
    other = tmp_path / "other-target"
    model = tiny_target(vocab_size=len(smol_tokenizer), tie_word_embeddings=True, num_hidden_layers=10)
    model.save_pretrained(other)
    smol_tokenizer.save_pretrained(other)
    with pytest.raises(SystemExit, match="refusing to mix"):
        dump_hidden(_cfg(other, data, tmp_path / "x", f"dump.out={dump}"))
    with pytest.raises(SystemExit, match="refusing to mix"):
        train(_cfg(other, data, tmp_path / "t", "train.mode=offline", f"train.hidden={dump}"))
    with pytest.raises(SystemExit, match="aux_layer_ids"):  # same target, other layers
        dump_hidden(_cfg(tiny_target_folder, data, tmp_path / "x", f"dump.out={dump}", "target.aux_layer_ids=[1,3,6]"))


@pytest.mark.parametrize("dtype, limit", [("bfloat16", 2), ("float8", 1)])
def test_bytes_per_token(tmp_path, tiny_target_folder, data, dtype, limit):
    """(3H + H) x bytes per value, plus ids and mask (and fp8's two scales), plus file headers."""
    dump = tmp_path / "dump"
    dump_hidden(_cfg(tiny_target_folder, data, tmp_path / "x", f"dump.out={dump}", f"dump.dtype={dtype}",
                     "dump.shard_tokens=100000"))
    m = json.loads((dump / "manifest.json").read_text())
    h = 64
    payload = 4 * h * limit + 5 + (8 if dtype == "float8" else 0)
    assert payload <= m["num_bytes"] / m["num_tokens"] < payload * 1.1


def test_fp8_dump_trains_close_to_bf16(tmp_path, tiny_target_folder, data):
    losses = {}
    for dtype in ("bfloat16", "float8"):
        dump = tmp_path / dtype
        dump_hidden(_cfg(tiny_target_folder, data, tmp_path / "x", f"dump.out={dump}", f"dump.dtype={dtype}"))
        train(_cfg(tiny_target_folder, data, tmp_path / f"t-{dtype}", "train.mode=offline", f"train.hidden={dump}"))
        losses[dtype] = json.loads((tmp_path / f"t-{dtype}" / "metrics.json").read_text())["train_losses"]
    torch.testing.assert_close(torch.tensor(losses["float8"]), torch.tensor(losses["bfloat16"]), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float8"])
def test_streamed_shard_is_standard_safetensors(tmp_path, dtype):
    """The shard writer builds the file itself (no concatenated copy); safetensors must read back exactly
    the tensors that `save_file` of the concatenation would hold, and the recorded checksum is the file's."""
    from safetensors.torch import load_file

    from specforge.data.shards import encode, file_sha256, write_shard
    from specforge.data.template import Sample

    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (5, 1, 9):
        samples.append(Sample(torch.randint(0, 1000, (n,), generator=g), torch.rand(n, generator=g) > 0.5,
                              aux=torch.randn(n, 12, generator=g).bfloat16(),
                              prenorm=torch.randn(n, 4, generator=g).bfloat16()))
    entry = write_shard(tmp_path, 3, samples, dtype)
    path = tmp_path / entry["file"]
    assert entry["bytes"] == path.stat().st_size and entry["sha256"] == file_sha256(path)
    got = load_file(str(path))
    want = {"input_ids": torch.cat([s.input_ids for s in samples]).int(),
            "loss_mask": torch.cat([s.loss_mask for s in samples]).to(torch.uint8),
            "offsets": torch.tensor([0, 5, 6, 15])}
    for key in ("aux", "prenorm"):
        for suffix, t in encode(torch.cat([getattr(s, key) for s in samples]), dtype).items():
            want[key + (f".{suffix}" if suffix else "")] = t
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


def test_online_and_offline_hold_out_the_same_after_drops(tmp_path, tiny_target_folder):
    """With data.too_long=drop, the held-out split counts the samples that remain in both modes (the dump
    stores only those), so online and offline still train on the same conversations."""
    from .test_train import write_conversations

    data = write_conversations(tmp_path / "d.jsonl", n=12)
    lines = (tmp_path / "d.jsonl").read_text().splitlines()
    long = json.loads(lines[1])
    long["messages"][1]["content"] = " ".join(["A much longer answer than the others."] * 12)
    lines[1] = json.dumps(long)
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    drop = ["data.max_length=80", "data.too_long=drop"]
    train(_cfg(tiny_target_folder, data, tmp_path / "online", *drop))
    dump = tmp_path / "dump"
    dump_hidden(_cfg(tiny_target_folder, data, tmp_path / "x", f"dump.out={dump}", "dump.dtype=float32", *drop))
    train(_cfg(tiny_target_folder, data, tmp_path / "offline", "train.mode=offline", f"train.hidden={dump}",
               "train.shuffle_window=100", *drop))
    on = json.loads((tmp_path / "online" / "metrics.json").read_text())
    off = json.loads((tmp_path / "offline" / "metrics.json").read_text())
    torch.testing.assert_close(torch.tensor(off["train_losses"]), torch.tensor(on["train_losses"]),
                               rtol=1e-5, atol=1e-5)
    assert abs(on["eval"]["loss_0"] - off["eval"]["loss_0"]) < 1e-4


def test_held_out_split_keeps_each_prompts_answers_together(tmp_path, tiny_target_folder):
    """prepare.samples=2 writes each prompt's answers as `id`, `id#1`: the held-out split takes every
    eval_every-th prompt with both its answers (holding out every 4th sample instead would take only the
    sampled `#1` answers and train on their greedy twins), and offline training reads the same split from
    the dump's manifest."""
    from specforge.data.shards import load_manifest
    from specforge.data.sources import ShardSource, prompt_groups
    from specforge.prepare import load_samples
    from specforge.targets import load_target

    from .test_train import write_conversations

    plain = write_conversations(tmp_path / "plain.jsonl", n=16).read_text().splitlines()
    data = tmp_path / "d.jsonl"
    with data.open("w") as f:
        for i, line in enumerate(plain):
            conv = json.loads(line)
            conv["id"] = f"q{i // 2}" + ("#1" if i % 2 else "")
            conv["messages"][1]["content"] += f" Note {i}."  # every sample's tokens distinct
            f.write(json.dumps(conv) + "\n")
    assert prompt_groups(["q0", "q0#1", "q1", "", "", "q1#1"]) == [0, 0, 1, 2, 3, 1]
    cfg = _cfg(tiny_target_folder, data, tmp_path / "online", "data.eval_every=4")
    target, tok = load_target(cfg.target, torch.device("cpu"))
    train_s, held = load_samples(cfg, target, tok)
    assert sorted(s.id for s in held) == ["q3", "q3#1", "q7", "q7#1"]  # prompts 3 and 7, both answers each
    assert len(train_s) == 12 and not {s.id.split("#")[0] for s in train_s} & {"q3", "q7"}
    dump = tmp_path / "dump"
    dump_hidden(_cfg(tiny_target_folder, data, tmp_path / "x", f"dump.out={dump}", "dump.dtype=float32",
                     "dump.shard_tokens=200", "data.eval_every=4"))
    manifest = load_manifest(dump)
    assert manifest.groups == [i // 2 for i in range(16)]
    raw = json.loads((dump / "manifest.json").read_text())  # rewritten after every shard: groups kept apart
    assert raw["grouped"] is True and "groups" not in raw
    src = ShardSource(cfg, dump, manifest, window=100, pad_id=0)
    assert sum(src.counts) == 12
    held_ids = sorted(tuple(s.input_ids.tolist()) for s in held)
    off_held = sorted(tuple(s.input_ids.tolist()) for s in src._samples(range(len(manifest.shards)), True))
    assert off_held == held_ids
    # A dump made before groups were recorded holds out by sample, as training then did.
    manifest.groups = None
    old = ShardSource(cfg, dump, manifest, window=100, pad_id=0)
    by_id = {tuple(s.input_ids.tolist()): s.id for s in train_s + held}
    old_held = sorted(by_id[tuple(s.input_ids.tolist())] for s in old._samples(range(len(manifest.shards)), True))
    assert old_held == ["q1#1", "q3#1", "q5#1", "q7#1"]  # every 4th sample: only sampled answers
    manifest.groups = [0] * 3
    with pytest.raises(SystemExit, match="its groups.json lists 3 samples, its shards hold 16"):
        ShardSource(cfg, dump, manifest, window=100, pad_id=0)
    (dump / "groups.json").unlink()
    with pytest.raises(SystemExit, match="groups.json: the dump's prompt groups are missing or damaged"):
        load_manifest(dump)
