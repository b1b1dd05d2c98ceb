"""prepare-data's prompts and answers: requests written by the target (Magpie) on the embedded model, the
near-duplicate filter, several answers per prompt, and prompt files mixed with synthesized requests."""

import json

import pytest
import torch

from specforge.config import load_config
from specforge.data.conversations import read_jsonl
from specforge.prepare import prepare_data
from specforge.synthesize import NearDuplicates, jaccard, normalise, shingles, synthesize, user_prefix


def test_near_duplicate_filter():
    """Word 3-gram Jaccard, by hand: a near copy (one word of 19 changed: 14 shared of 20 shingles), a short
    request with its last word changed (3 of 5) and a copy differing only in case and punctuation are dropped
    at 0.6; requests on the same theme in other words (2 of 13) stay."""
    base = "Write a short poem about the first snowfall of the year in a small mountain town with old houses."
    near = "Write a short poem about the first snowfall of the year in a small mountain village with old houses."
    same = "write a SHORT poem about the first snowfall of the year, in a small mountain town with old houses!!"
    other = "Write a short poem about the last sunset of the summer over a quiet harbour."
    short, short2 = "Write a poem about the sea.", "Write a poem about the ocean."
    rivers = "Name three rivers in Europe."
    assert jaccard(shingles(normalise(base)), shingles(normalise(near))) == pytest.approx(14 / 20)
    assert jaccard(shingles(normalise(base)), shingles(normalise(other))) == pytest.approx(2 / 13)
    assert jaccard(shingles(normalise(short)), shingles(normalise(short2))) == pytest.approx(3 / 5)
    assert shingles(normalise(same)) == shingles(normalise(base))
    dedup = NearDuplicates(0.6)
    assert [dedup.add(t) for t in (base, near, same, other, short, short2, rivers, other)] == \
        [True, False, False, True, True, False, True, False]
    loose = NearDuplicates(0.75)  # a higher threshold keeps the near copy
    assert [loose.add(base), loose.add(near)] == [True, True]


def test_near_duplicate_filter_finds_near_copies_among_many():
    """1,000 distinct requests of 20 words, then a variant of each with its middle word changed (Jaccard
    15/21 = 0.71): every variant is caught (LSH candidates, confirmed exactly), no original is dropped."""
    words = [f"w{i}" for i in range(400)]
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[j] for j in torch.randint(0, 400, (20,), generator=g).tolist()) for _ in range(1000)]
    dedup = NearDuplicates(0.6)
    assert all(dedup.add(t) for t in texts)
    variants = [" ".join(t.split()[:10] + ["changed"] + t.split()[11:]) for t in texts]
    assert not any(dedup.add(t) for t in variants)


@pytest.fixture(scope="module")
def smol():
    from specforge.targets import load_target

    return load_target(load_config().target, torch.device("cpu"), torch.bfloat16)


def test_user_prefix_keeps_the_default_system_prompt(smol_tokenizer):
    text = smol_tokenizer.decode(user_prefix(smol_tokenizer, []))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant") and text.endswith("<|im_start|>user\n")


def test_synthesis_on_the_embedded_model(smol):
    """N distinct non-empty requests; the same ones for the same seed, others for another seed."""
    model, tok = smol
    pc = load_config(overrides=["prepare.synth_max_tokens=40"]).prepare
    first = synthesize(model, tok, pc, 3, tok.pad_token_id)
    texts = [c.messages[0]["content"] for c in first]
    assert len(texts) == 3 and all(t.strip() for t in texts) and len({" ".join(normalise(t)) for t in texts}) == 3
    assert all(c.messages[0]["role"] == "user" and len(c.messages) == 1 for c in first)
    assert [c.messages for c in synthesize(model, tok, pc, 3, tok.pad_token_id)] == [c.messages for c in first]
    pc.seed = 1
    assert [c.messages[0]["content"] for c in synthesize(model, tok, pc, 3, tok.pad_token_id)] != texts


def _prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_several_answers_per_prompt(tmp_path, tiny_target_folder):
    """samples=3: three conversations per prompt with distinct ids, adjacent, the greedy one first (equal to
    the samples=1 greedy answer), the other two sampled and different; turn by turn for a two-turn prompt."""
    prompts = _prompts(tmp_path / "p.jsonl", [{"id": "a", "turns": ["Tell me about the sea."]},
                                               {"id": "b", "turns": ["Name a colour.", "And another one?"]}])
    common = [f"target.path={tiny_target_folder}", f"prepare.prompts={prompts}", "prepare.max_new_tokens=10",
              "prepare.dtype=float32"]
    greedy = list(read_jsonl(prepare_data(load_config(overrides=common + [f"out_dir={tmp_path / 'g'}"]))))
    cfg = load_config(overrides=common + [f"out_dir={tmp_path / 's'}", "prepare.samples=3",
                                          "prepare.temperature=1.5"])
    convs = list(read_jsonl(prepare_data(cfg)))
    assert [c.id for c in convs] == ["a", "a#1", "a#2", "b", "b#1", "b#2"]
    assert [c.messages for c in convs[::3]] == [c.messages for c in greedy]
    for group in (convs[:3], convs[3:]):
        assert len({json.dumps(c.messages) for c in group}) == 3
    assert [m["role"] for m in convs[4].messages] == ["user", "assistant", "user", "assistant"]
    assert convs[4].messages[2]["content"] == "And another one?"
    # Reproducible: the same settings write the same file.
    again = list(read_jsonl(prepare_data(load_config(overrides=common + [f"out_dir={tmp_path / 't'}",
                                                                         "prepare.samples=3",
                                                                         "prepare.temperature=1.5"]))))
    assert [c.messages for c in again] == [c.messages for c in convs]


def test_prompt_file_mixed_with_synthesized_requests(tmp_path, smol):
    """prepare.prompts and prepare.synthesize together: the file's prompts, then the target's requests, all
    answered; the requests are kept next to the prepared data and a rerun reads them from there."""
    model, tok = smol
    prompts = _prompts(tmp_path / "p.jsonl", [{"id": "a", "turns": ["What is the capital of France?"]}])
    cfg = load_config(overrides=[f"out_dir={tmp_path}", f"prepare.prompts={prompts}", "prepare.synthesize=2",
                                 "prepare.synth_max_tokens=40", "prepare.max_new_tokens=8"])
    convs = list(read_jsonl(prepare_data(cfg, model, tok)))
    synth_file = tmp_path / "prepared.synthesized.jsonl"
    kept = list(read_jsonl(synth_file))
    assert [c.id for c in convs] == ["a", "synth-000000", "synth-000001"]
    assert [c.messages[0]["content"] for c in convs[1:]] == [c.messages[0]["content"] for c in kept]
    assert all(c.messages[-1]["role"] == "assistant" and c.messages[-1]["content"] for c in convs)
    # The rerun reads the file (edited here, so reading it is checked, not assumed).
    lines = synth_file.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["messages"][0]["content"] = "Name three rivers in Europe."
    synth_file.write_text("\n".join([lines[0], json.dumps(edited)]) + "\n")
    rerun = list(read_jsonl(prepare_data(cfg, model, tok)))
    assert rerun[2].messages[0]["content"] == "Name three rivers in Europe."
    assert rerun[1].messages == convs[1].messages


def test_second_turns_written_by_the_target(smol):
    """synth_turns=2: after its own answer the target writes the user's follow-up (kept when it passes the
    filters; the conversation stays single-turn otherwise)."""
    model, tok = smol
    pc = load_config(overrides=["prepare.synth_max_tokens=40", "prepare.synth_turns=2",
                                "prepare.max_new_tokens=24"]).prepare
    convs = synthesize(model, tok, pc, 3, tok.pad_token_id)
    assert all([m["role"] for m in c.messages] in (["user"], ["user", "user"]) for c in convs)
    assert any(len(c.messages) == 2 for c in convs)
    assert all(c.messages[1]["content"].strip() and c.messages[1]["content"] != c.messages[0]["content"]
               for c in convs if len(c.messages) == 2)


@pytest.mark.parametrize("override, words", [
    ("prepare.samples=2", "needs prepare.temperature > 0"),
    ("prepare.synth_turns=3", "choose 1 or 2"),
    ("prepare.batch_size=0", "need at least 1"),
])
def test_settings_that_cannot_work(tmp_path, override, words):
    extra = ["prepare.synthesize=4"] if "synth" in override else []
    with pytest.raises(SystemExit, match=words):
        prepare_data(load_config(overrides=[f"out_dir={tmp_path}", override, *extra]))
