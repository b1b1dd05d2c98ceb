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


def test_hits_match_ttt_accuracy():
    # A small vocab, so that a random draft guesses some tokens right and some wrong.
    target = tiny_target(seed=2, initializer_range=0.3, vocab_size=16)
    draft = tiny_draft(target, draft_vocab=12).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (80,))
    mask = torch.zeros(80, dtype=torch.bool)
    mask[6:40] = True
    mask[47:] = True
    sample = Sample(ids, mask)
    cap, head = FeatureCapture(target, [2, 4, 5]), TargetHead.from_model(target)
    rec = miss.position_records(target, cap, head, draft, sample, 3, torch.device("cpu"))
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
