"""Conversation formats, the assistant-only loss mask, truncation, and the draft vocab."""

import json
from collections import Counter

import pytest
import torch

from specforge.data.batching import collate, epoch_batches
from specforge.data.conversations import Conversation, DataError, read_jsonl
from specforge.data.template import Sample, tokenize_conversation
from specforge.data.vocab import build_vocab, count_tokens, coverage


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_sharegpt_and_openai_forms_agree(tmp_path):
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    openai = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    a = list(read_jsonl(_write(tmp_path / "a.jsonl", [sharegpt])))[0]
    b = list(read_jsonl(_write(tmp_path / "b.jsonl", [openai])))[0]
    assert a.messages == b.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


@pytest.mark.parametrize("line, field", [
    ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role: unknown role 'wizard'"),
    ('{"conversations": [{"from": "human"}]}', "conversations[0] needs 'from' and 'value'"),
    ('{"text": "hi"}', "no 'messages', 'conversations' or 'turns' field"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, field):
    path = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "ok"}]}, line])
    with pytest.raises(DataError) as e:
        list(read_jsonl(path))
    assert f"{path}:2" in str(e.value) and field in str(e.value)


def test_loss_mask_hand_checked(smol_tokenizer):
    """ChatML: only the assistant's text and its <|im_end|> are trained on, in every assistant turn."""
    conv = Conversation(messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}])
    s = tokenize_conversation(smol_tokenizer, conv, max_length=1000)
    pieces = [smol_tokenizer.decode([i]) for i in s.input_ids.tolist()]
    masked = [p for p, m in zip(pieces, s.loss_mask.tolist()) if m]
    assert masked == ["Hello", " there", ".", "<|im_end|>", "By", "e", "!", "<|im_end|>"]
    # The unmasked text is the system prompt, the user turns and the assistant headers.
    text = smol_tokenizer.decode(s.input_ids[~s.loss_mask].tolist())
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # Truncation keeps the first max_length tokens and their mask.
    short = tokenize_conversation(smol_tokenizer, conv, max_length=34)
    assert torch.equal(short.input_ids, s.input_ids[:34]) and torch.equal(short.loss_mask, s.loss_mask[:34])


def test_conversation_without_answer_or_with_empty_answer(smol_tokenizer):
    with pytest.raises(DataError, match="no assistant turn"):
        tokenize_conversation(smol_tokenizer, Conversation([{"role": "user", "content": "x"}], id="c1"), 10)
    with pytest.raises(DataError, match="empty content"):
        tokenize_conversation(smol_tokenizer, Conversation(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]), 10)


def test_vocab_round_trip_and_frequency_order():
    samples = [Sample(torch.tensor([5, 5, 5, 9, 9, 2, 7]), torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool))]
    counts = count_tokens(samples, 12)
    assert counts.tolist() == [0, 0, 1, 0, 0, 3, 0, 0, 0, 2, 0, 0]  # token 7 is outside the loss mask
    d2t, t2d = build_vocab(counts, 4)
    draft_ids = torch.arange(4)
    target_ids = draft_ids + d2t
    # The three seen tokens, then the lowest unseen id; sorted by target id.
    assert target_ids.tolist() == [0, 2, 5, 9]
    assert t2d.nonzero().flatten().tolist() == [0, 2, 5, 9]
    # Round trip: target -> draft -> target for every kept token.
    t2d_index = torch.cumsum(t2d.long(), 0) - 1
    assert torch.equal(t2d_index[target_ids], draft_ids)
    assert coverage(counts, t2d) == 1.0
    d2t2, _ = build_vocab(counts, 2)
    assert (torch.arange(2) + d2t2).tolist() == [5, 9]


def test_count_tokens_over_chunks_equals_a_counter():
    """Counts across chunk boundaries (and samples with nothing masked) equal a plain Counter's; ids at or
    above vocab_size are not counted."""
    g = torch.Generator().manual_seed(0)
    samples, ref = [], Counter()
    for i in range(23):
        n = int(torch.randint(1, 30, (1,), generator=g))
        ids = torch.randint(0, 40, (n,), generator=g)
        mask = torch.rand(n, generator=g) < (0.0 if i % 7 == 3 else 0.6)
        samples.append(Sample(ids, mask, id=str(i)))
        ref.update(t for t, m in zip(ids.tolist(), mask.tolist()) if m and t < 37)
    want = [ref[t] for t in range(37)]
    for chunk in (1, 4, 5, 100):
        assert count_tokens(samples, 37, chunk=chunk).tolist() == want
    assert count_tokens([], 37).tolist() == [0] * 37


def test_batches_are_seeded_and_cover_every_sample():
    lengths = [3, 9, 1, 7, 5, 2, 8, 4, 6, 10]
    a = epoch_batches(10, lengths, 3, seed=0, epoch=0)
    assert a == epoch_batches(10, lengths, 3, seed=0, epoch=0)
    assert a != epoch_batches(10, lengths, 3, seed=0, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    batch = collate([Sample(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1], dtype=torch.bool)),
                     Sample(torch.tensor([4]), torch.tensor([1], dtype=torch.bool))], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.loss_mask.tolist() == [[False, True, True], [True, False, False]]
