"""scripts/miss_analysis.py counts what training counts: its per-position step-0 hits add up to the TTT loss's
accuracy on the same conversation, and its answer positions restart at every assistant turn."""

import importlib.util
from pathlib import Path

import torch

from specforge.data.template import Sample
from specforge.eagle3.ttt import next_token_mask, soft_labels, ttt_loss
from specforge.targets import FeatureCapture, TargetHead

from .conftest import tiny_draft, tiny_target

spec = importlib.util.spec_from_file_location("miss_analysis", Path(__file__).parents[1] / "scripts/miss_analysis.py")
miss = importlib.util.module_from_spec(spec)
spec.loader.exec_module(miss)


def test_answer_position_restarts_per_turn():
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    assert miss.answer_position(mask).tolist() == [-1, -1, 0, 1, 2, -1, 0, 1, -1]


def _records(seed: int, length: int, spans, steps: int):
    """A tiny target with a 16-token vocab and a draft of its first 12 ids (so that a random draft guesses some
    tokens right and some wrong), random ids with loss spans, and the script's records of them."""
    target = tiny_target(seed=2, initializer_range=0.3, vocab_size=16)
    draft = tiny_draft(target, draft_vocab=12).eval()
    torch.manual_seed(seed)
    ids = torch.randint(0, 16, (length,))
    mask = torch.zeros(length, dtype=torch.bool)
    for a, b in spans:
        mask[a:b] = True
    cap, head = FeatureCapture(target, [2, 4, 5]), TargetHead.from_model(target)
    rec = miss.position_records(target, cap, head, draft, Sample(ids, mask), steps, torch.device("cpu"))
    return draft, ids, mask, cap, head, rec


def test_hits_match_ttt_accuracy():
    draft, ids, mask, cap, head, rec = _records(0, 80, [(6, 40), (47, 80)], 3)
    f = cap.run(ids[None], torch.ones(1, 80, dtype=torch.long))
    draft_ids = torch.arange(12) + draft.d2t
    labels = soft_labels(f.final, head.lm_head_weight, draft_ids, next_token_mask(mask[None]))
    with torch.no_grad():
        _, stats = ttt_loss(draft, ids[None], mask[None], f.aux, labels, 3, mask_out_of_vocab=False, fused=False,
                            attention="reference")
    assert len(rec["hit"]) == int(stats[0].count)
    assert int(rec["hit"].sum()) == int(stats[0].correct)
    assert (rec["hit4"] >= rec["hit"]).all() and (rec["streak"] >= rec["hit"].long()).all()
    assert ((rec["p1"] > 0) & (rec["p1"] <= 1) & (rec["margin"] >= 0)).all()
    assert 0 < int(stats[0].correct) < int(stats[0].count)  # a check that can fail both ways


def test_vocab_table_counts_by_hand():
    # The draft's vocab is ids 0..11 (tiny_draft); counts falling with the id rebuild that same vocab at size 12,
    # so the table's row for the draft must equal the records' own in_vocab, and a vocab of every id has no miss.
    rec = _records(1, 60, [(4, 60)], 2)[-1]
    counts = torch.arange(16, 0, -1)
    text, rows = miss.vocab_table(rec, counts, [8, 16], 12)
    by = {r["size"]: r for r in rows}
    assert sorted(by) == [8, 12, 16]
    want, hit, p1 = rec["want"].tolist(), rec["hit"].tolist(), rec["p1"].tolist()
    for n in (8, 12):
        out = [w >= n for w in want]  # the n most counted ids are 0..n-1
        assert abs(by[n]["all"] - sum(out) / len(out)) < 1e-9
        sure = [o for o, p in zip(out, p1) if p >= 0.95]
        if sure:
            assert abs(by[n]["sure"] - sum(sure) / len(sure)) < 1e-9
        misses = [o for o, h in zip(out, hit) if not h]
        assert abs(by[n]["misses"] - sum(misses) / max(1, len(misses))) < 1e-9
    assert abs(by[12]["all"] - (1 - rec["in_vocab"].double().mean().item())) < 1e-12
    assert by[16]["all"] == 0 and by[16]["misses"] == 0
    assert 0 < by[8]["all"]  # some wanted ids fall outside the smallest vocab: the check can fail both ways
    assert "(this draft)" in text
