"""Batched generation over the static KV cache (specforge/generate.py): greedy output equals HF `generate` on
each prompt alone, token for token, with prompts of different lengths left padded into one batch and rows
stopping at different steps; seeded sampling draws from softmax(logits / T), and a request's tokens depend on
its seed and key only, not on the batch it is decoded in."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from specforge.generate import Request, generate, mix32, pick, row_seeds, stop_ids

from .conftest import tiny_target

LENGTHS = (5, 9, 2, 13, 7)


def _prompts(seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _windowed():
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                        sliding_window=6, initializer_range=0.5)
    return MistralForCausalLM(cfg).eval().requires_grad_(False)


@pytest.mark.parametrize("family", ["llama", "mistral-window"])
@pytest.mark.parametrize("batch_size", [5, 2])
def test_greedy_equals_hf_generate_per_prompt(family, batch_size):
    """float32: one batch of five left-padded prompts (or batches of two: three caches, one reused), rows
    stopping at different steps. The windowed target (a 6-token sliding window, shorter than the longest
    sequence) checks that each row's window counts from its own first token, padding aside."""
    model = tiny_target(vocab_size=256, initializer_range=0.5) if family == "llama" else _windowed()
    prompts = _prompts()
    full = [_hf_greedy(model, p, 20) for p in prompts]
    # Stop tokens seen at different steps of different rows; each reference ends at its first stop token.
    stop = sorted({full[0][3], full[1][11]})
    want = []
    for row in full:
        cut = next((j for j, t in enumerate(row) if t in stop), None)
        want.append((row if cut is None else row[:cut], cut is not None))
    assert len({len(w[0]) for w in want}) > 2 and any(s for _, s in want) and not all(s for _, s in want)
    got = generate(model, [Request(p) for p in prompts], 20, stop, pad_id=0, batch_size=batch_size,
                   cache_round=8)
    assert [(g.tokens, g.stopped) for g in got] == want


def test_sampling_is_reproducible_and_independent_of_the_batch():
    model = tiny_target(vocab_size=256, initializer_range=0.2)
    prompts = _prompts(1)
    reqs = [Request(p, 1.0, key=100 + i) for i, p in enumerate(prompts)]
    batch = [g.tokens for g in generate(model, reqs, 16, [], 0, seed=7)]
    alone = [generate(model, [r], 16, [], 0, seed=7)[0].tokens for r in reqs]
    assert batch == alone
    assert [g.tokens for g in generate(model, reqs[::-1], 16, [], 0, seed=7, batch_size=2)] == batch[::-1]
    other = [g.tokens for g in generate(model, reqs, 16, [], 0, seed=8)]
    assert all(a != b for a, b in zip(batch, other))
    greedy = [g.tokens for g in generate(model, [Request(p) for p in prompts], 16, [], 0)]
    assert all(a != b for a, b in zip(batch, greedy))
    # Greedy and sampled rows in one batch: each as if alone.
    mixed = generate(model, [Request(prompts[0]), reqs[1]], 16, [], 0, seed=7)
    assert [g.tokens for g in mixed] == [greedy[0], batch[1]]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_max_draws_from_the_softmax(temperature):
    """40,000 rows (distinct keys) over one set of 6 logits: the counts match softmax(logits / T) within 4
    standard deviations, and each row's draw changes with the step."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    n = 40000
    rows = row_seeds(3, list(range(n)))
    token_hash = mix32(torch.arange(6))
    temps = torch.full((n,), temperature)
    draws = pick(logits.expand(n, 6), temps, rows, torch.tensor([5]), token_hash)
    p = torch.softmax(logits / temperature, -1)
    counts = torch.bincount(draws, minlength=6).double()
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() < 4 * sigma).all(), (counts / n, p)
    later = pick(logits.expand(n, 6), temps, rows, torch.tensor([6]), token_hash)
    same = (later == draws).double().mean()
    assert same < (p ** 2).sum() + 0.02  # independent draws agree about sum p^2 of the time


def test_stop_ids_of_the_chat_template(smol_tokenizer):
    assert stop_ids(smol_tokenizer) == [smol_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_bf16_cpu_decode_attention_equals_float64():
    """grouped_attention's plain path (bf16 on the CPU, a few query rows per kv head: batched decoding) against
    float64 attention over the same masked cache, within bf16 rounding."""
    from specforge.layers import cache_mask, grouped_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, n, s, 16, generator=g, dtype=torch.float64) for n, s in ((6, 1), (2, 24), (2, 24)))
    mask = torch.rand(4, 1, 24, generator=g) < 0.6
    mask[..., 0] = True
    got = grouped_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cache_mask(mask, 3)).double()
    kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    w = (q @ kr.transpose(-1, -2) / 4).masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    torch.testing.assert_close(got, w @ vr, rtol=0, atol=3e-2)
