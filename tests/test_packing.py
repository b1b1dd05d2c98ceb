"""Sequence packing (train.pack): several conversations share a row, and every number computed on a packed
row is the number of its conversations computed alone."""

import json

import pytest
import torch

from specforge.config import load_config
from specforge.data.batching import collate, collate_packed, epoch_packed_batches, pack_rows
from specforge.data.template import Sample
from specforge.dump import dump_hidden
from specforge.eagle3.checkpoint import step_folders
from specforge.data.sources import MemorySource
from specforge.eagle3.train import train
from specforge.eagle3.ttt import SoftLabels, step_weights, ttt_loss
from specforge.targets import FeatureCapture, document_mask

from .conftest import tiny_draft, tiny_target
from .test_resume import _assert_same, _result
from .test_train import write_conversations


def _samples(lengths, vocab=256, seed=0, aux_dim=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n // 3:] = True  # a "prompt" then an "answer"
        aux = None if aux_dim is None else torch.randn(n, aux_dim, generator=g, dtype=torch.float64)
        prenorm = None if aux_dim is None else aux[:, :8]  # collate wants both features (unused here)
        out.append(Sample(torch.randint(1, vocab, (n,), generator=g), mask, aux=aux, prenorm=prenorm))
    return out


def test_packing_fills_rows_and_visits_every_sample_once():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (200,), generator=g).tolist() + [80, 100]  # two longer than a row
    plan = epoch_packed_batches(lengths, 64, 4, seed=3, epoch=0)
    assert plan == epoch_packed_batches(lengths, 64, 4, seed=3, epoch=0)
    assert plan != epoch_packed_batches(lengths, 64, 4, seed=3, epoch=1)
    rows = [row for batch in plan for row in batch]
    assert all(len(batch) == 4 for batch in plan[:-1]) and 1 <= len(plan[-1]) <= 4
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[i] for i in row) <= 64 or len(row) == 1
    assert len(rows) < 1.1 * sum(lengths) / 64  # rows are nearly full
    assert pack_rows([0, 1, 2], [5, 5, 5], 10) == [[0, 1], [2]]

    samples = _samples([5, 3, 4])
    b = collate_packed([[samples[0], samples[1]], [samples[2]]])
    assert b.doc_ids.tolist() == [[0] * 5 + [1] * 3, [0] * 4 + [-1] * 4]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert b.attention_mask.sum(1).tolist() == [8, 4]
    assert b.pad_to_multiple(16).doc_ids[1, 4:].tolist() == [-1] * 12
    assert collate(samples).doc_ids is None  # unpacked batches are as before

    source = MemorySource(_samples(lengths), [], 4, seed=3, pad_id=0, pack_length=64)
    batches = list(source.train_batches(0))
    assert len(batches) == source.steps_per_epoch() == len(plan)
    assert all(b.input_ids.shape[1] <= 100 for b in batches)
    assert sum(b.num_tokens for b in batches) == sum(lengths)
    # Resume: skipping k batches gives the tail of the same list.
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(source.train_batches(0, skip=3), batches[3:]))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_target_features_equal_each_conversation_alone(impl):
    target = tiny_target(dtype=torch.float64)
    target.set_attn_implementation(impl)
    cap = FeatureCapture(target, [2, 4, 5])
    tol = 1e-10 if impl == "sdpa" else 1e-5  # HF's eager attention takes its softmax in float32
    samples = _samples([9, 14, 5, 11])
    rows = [[samples[0], samples[1], samples[2]], [samples[3]]]
    b = collate_packed(rows)
    packed = cap.run(b.input_ids, document_mask(b.doc_ids), b.position_ids)
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s.input_ids)
            alone = cap.run(s.input_ids[None], torch.ones(1, n, dtype=torch.long))
            torch.testing.assert_close(packed.aux[r, start:start + n], alone.aux[0], rtol=tol, atol=tol)
            torch.testing.assert_close(packed.final[r, start:start + n], alone.final[0], rtol=tol, atol=tol)
            start += n
    cap.remove()


@pytest.mark.parametrize("attention", ["reference", "flex"])
def test_packed_ttt_loss_equals_the_conversations_alone(attention):
    """Summed soft CE, correct, acceptance and counts of every step over a packed batch equal the sums over
    the conversations run one by one (denominators of 1 make each step's loss a sum, not a mean)."""
    target = tiny_target(dtype=torch.float64)
    draft = tiny_draft(target, dtype=torch.float64)
    steps = 4
    samples = _samples([9, 14, 6, 12, 3], aux_dim=192, seed=1)
    g = torch.Generator().manual_seed(2)
    draft_ids = torch.arange(64) + draft.d2t

    fulls = [torch.randn(len(s.input_ids), 256, generator=g, dtype=torch.float64) * 3 for s in samples]

    def run(batch, full):
        labels = SoftLabels(full[..., draft_ids], torch.logsumexp(full, -1), full.argmax(-1))
        ones = torch.ones(steps, dtype=torch.float64)
        _, stats = ttt_loss(draft, batch.input_ids, batch.loss_mask, batch.aux, labels, steps,
                            attention=attention, denominators=ones, doc_ids=batch.doc_ids,
                            position_ids=batch.position_ids)
        w = step_weights(batch.loss_mask, labels, draft.t2d, steps, True, batch.doc_ids)
        return stats, w

    rows = [[0, 1, 2], [3, 4]]
    packed = collate_packed([[samples[i] for i in row] for row in rows])
    t = packed.input_ids.shape[1]
    full = torch.zeros(len(rows), t, 256, dtype=torch.float64)
    for r, row in enumerate(rows):
        full[r, :sum(len(samples[i].input_ids) for i in row)] = torch.cat([fulls[i] for i in row])
    p_stats, p_w = run(packed, full)
    alone = [run(collate([s]), fulls[i][None]) for i, s in enumerate(samples)]
    torch.testing.assert_close(p_w, sum(w for _, w in alone))
    for k in range(steps):
        torch.testing.assert_close(p_stats[k].loss, sum(st[k].loss for st, _ in alone), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(p_stats[k].accept, sum(st[k].accept for st, _ in alone), rtol=1e-10, atol=1e-10)
        assert int(p_stats[k].correct) == sum(int(st[k].correct) for st, _ in alone)
        assert int(p_stats[k].count) == sum(int(st[k].count) for st, _ in alone) > 0


# ---- end to end: online and offline training with train.pack=true, stopped and resumed bitwise ----

STEPS = 7


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("data") / "d.jsonl", n=14)


def _cfg(folder, data, out, *extra):
    return load_config(str(folder), overrides=[
        f"out_dir={out}", f"data.train_path={data}", "data.eval_every=5", "data.max_length=160",
        "train.pack=true", "train.batch_size=2", f"train.max_steps={STEPS}", "train.ttt_length=3",
        "train.lr=3e-3", "train.warmup_steps=2", "train.save_dtype=float32",
        "target.draft.draft_vocab_size=512", *extra])


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_packed_training_runs_and_resumes_bitwise(tmp_path, tiny_target_folder, data, mode):
    extra = []
    if mode == "offline":
        dump = tmp_path / "h"
        dump_hidden(_cfg(tiny_target_folder, data, tmp_path / "x", f"dump.out={dump}", "dump.dtype=float32",
                         "dump.shard_tokens=150", "dump.batch_size=3"))
        extra = ["train.mode=offline", f"train.hidden={dump}", "train.shuffle_window=2"]
    train(_cfg(tiny_target_folder, data, tmp_path / "unbroken", *extra))
    unbroken = _result(tmp_path / "unbroken")
    assert len(unbroken[0]) == STEPS and all(x == x for x in unbroken[0])
    metrics = json.loads((tmp_path / "unbroken" / "metrics.json").read_text())
    assert metrics["eval"]["acc_0"] >= 0
    out = tmp_path / "run"
    train(_cfg(tiny_target_folder, data, out, *extra, "train.stop_after=4"))
    assert [p.name for p in step_folders(out / "checkpoints")] == ["step_0000004"]
    train(_cfg(tiny_target_folder, data, out, *extra, "train.resume=latest"))
    _assert_same(_result(out), unbroken)
