"""The decoder on a GPU: CUDA-graph replay (of whole rounds, and of blocks of plain steps), with and without
torch.compile, computes what eager execution computes (float32, so that greedy outputs can be compared exactly),
for chains and trees, dense and mixture-of-experts targets. Skipped without CUDA."""

import pytest
import torch

from specforge.eagle3.decoder import SpecDecoder

from .conftest import tiny_draft, tiny_target

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
AUX = [2, 4, 5]


@pytest.mark.parametrize("steps, topk, tokens", [(5, 1, None), (3, 1, None), (5, 4, 16), (4, 2, 8)])
def test_graphs_equal_eager_and_plain(steps, topk, tokens):
    target = tiny_target(seed=3, initializer_range=0.4).cuda()
    draft = tiny_draft(target).cuda()
    prompts = [[5, 17, 99, 3], [200, 1, 1, 7, 8, 9, 10], list(range(40, 80))]
    outs = {}
    for graphs, compile in ((False, False), (True, False), (True, True)):
        dec = SpecDecoder(target, draft, AUX, max_len=200, spec_steps=steps, topk=topk, num_draft_tokens=tokens,
                          cuda_graphs=graphs, compile=compile, span_step=32)  # graphs for several spans
        outs[graphs, compile] = [(dec.generate(p, 48)[0], dec.generate_plain(p, 48)[0]) for p in prompts]
    for (spec_e, plain_e), (spec_g, plain_g), (spec_c, plain_c) in zip(*outs.values()):
        assert spec_g == spec_e and plain_g == plain_e
        assert spec_e == plain_e
        assert spec_c == plain_c  # compiled kernels round differently: equal to plain, not necessarily to eager


@pytest.mark.parametrize("topk, tokens", [(1, None), (4, 16)])
def test_capture_ahead_covers_every_span(topk, tokens):
    """After capture(), greedy decoding over every span meets only captured graphs, and its outputs equal
    those of a decoder that captured on first use (the dummy rounds left nothing in the caches that matters)."""
    target = tiny_target(seed=3, initializer_range=0.4).cuda()
    draft = tiny_draft(target).cuda()
    prompts = [[5, 17, 99, 3], list(range(40, 120))]
    lazy = SpecDecoder(target, draft, AUX, max_len=200, spec_steps=5, topk=topk, num_draft_tokens=tokens,
                       cuda_graphs=True, span_step=32)
    want = [(lazy.generate(p, 100)[0], lazy.generate_plain(p, 100)[0]) for p in prompts]
    ahead = SpecDecoder(target, draft, AUX, max_len=200, spec_steps=5, topk=topk, num_draft_tokens=tokens,
                        cuda_graphs=True, span_step=32)
    assert ahead.capture() > 0
    keys = set(ahead._graphs)
    got = [(ahead.generate(p, 100)[0], ahead.generate_plain(p, 100)[0]) for p in prompts]
    assert got == want
    new = set(ahead._graphs) - keys
    assert not new, f"captured while decoding: {sorted(new)}"
    assert ahead.capture() == 0


@pytest.mark.parametrize("family", ["llama4", "qwen3_moe"])
@pytest.mark.parametrize("topk, tokens", [(1, None), (3, 10)])
def test_moe_targets_graphs_equal_eager_and_plain(family, topk, tokens):
    """Llama 4 (chunks of 6 positions, so the per-slot positions that narrow the mask are read inside the
    captured graphs) and Qwen3-MoE, float32."""
    from .test_static_target import build

    target = build(family).float().cuda()
    draft = tiny_draft(target).cuda()
    prompts = [[5, 17, 99, 3], list(range(40, 70))]
    outs = {}
    for graphs in (False, True):
        dec = SpecDecoder(target, draft, AUX, max_len=120, spec_steps=4, topk=topk, num_draft_tokens=tokens,
                          cuda_graphs=graphs)
        assert dec.cuda_graphs == graphs  # the experts path is capturable: no fallback to eager
        outs[graphs] = [(dec.generate(p, 40)[0], dec.generate_plain(p, 40)[0]) for p in prompts]
    assert outs[True] == outs[False]
    assert all(spec == plain for spec, plain in outs[True])


@pytest.mark.parametrize("length", [2, 9, 63, 64, 65, 150, 197])
def test_prompt_graphs_equal_unpadded_eager(length):
    """A prompt's prefill from its padded graph (target and draft) equals the unpadded eager forward: the
    logits of the last row, the features of every row, the draft's output, and the caches' filled slots. (A
    target of the usual init scale: the wide one above amplifies float32 rounding, padded or not, to 1e-3.)"""
    target = tiny_target(seed=3).cuda()
    draft = tiny_draft(target).cuda()
    prompt = torch.randint(0, target.config.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    got = {}
    for graphs in (False, True):
        dec = SpecDecoder(target, draft, AUX, max_len=200, spec_steps=5, cuda_graphs=graphs)
        if graphs:
            assert dec.capture_prompts() > 0
        logits, aux = dec._prefill(prompt.tolist())
        after = torch.cat([prompt[1:], prompt[:1]]).cuda()
        h = dec._draft_prefill(aux, after, 0, length)
        got[graphs] = (logits, aux, h, dec.target.k_cache[:, :, :, :length].clone(), dec.dk[:, :, :length].clone())
        if graphs:
            assert ("prompt", -(-length // 64) * 64 if length <= 192 else 206) in dec._graphs
    for eager, graph in zip(got[False], got[True]):
        torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows, glu", [("loop", False), ("dot", False), ("dot", True)])
@pytest.mark.parametrize("compile", [False, True])
def test_bf16_verify_rows_equal_decode_steps_bitwise(rows, glu, compile, monkeypatch):
    """In bf16, where the skinny linear kernel and the cache attention kernel run, each token's logits and
    features in a verify of 6 (chain) or 16 (tree) tokens equal bit for bit those of one-token decode steps
    over the same cache: what makes greedy speculative decoding give plain decoding's tokens exactly. SmolLM2's
    widths (hidden 576, 9 query heads over 3 kv heads of 64), from CUDA graphs; `glu`: the target built with
    GLU_EPILOGUE (silu(gate) * up in the gate/up projection's launch)."""
    from specforge.kernels import skinny_linear

    monkeypatch.setattr(skinny_linear, "ROWS", rows)
    monkeypatch.setattr(skinny_linear, "GLU_EPILOGUE", glu)
    target = tiny_target(seed=3, dtype=torch.bfloat16, vocab_size=4096, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=6, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         initializer_range=0.1).cuda()
    draft = tiny_draft(target, dtype=torch.bfloat16).cuda()
    dec = SpecDecoder(target, draft, AUX, max_len=512, spec_steps=5, cuda_graphs=True, compile=compile)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 4096, (150,), generator=gen).tolist()  # the round crosses a 64-slot range
    dec._prefill(prompt)
    n = len(prompt)
    toks = torch.randint(0, 4096, (16,), generator=gen).cuda()
    pos = n + torch.arange(16, device="cuda")
    one = torch.ones(1, 1, dtype=torch.bool, device="cuda")
    for t in (6, 16):
        dec._fit(dec.round_slots(n))
        causal = torch.ones(t, t, dtype=torch.bool, device="cuda").tril()
        logits, aux = (x.reshape(t, -1).clone() for x in dec._target(toks[:t], pos[:t], pos[:t], pos[:1], causal))
        for i in range(t):
            l1, a1 = (x.reshape(1, -1) for x in dec._target(toks[i:i + 1], pos[i:i + 1], pos[i:i + 1],
                                                             pos[i:i + 1], one))
            assert torch.equal(l1[0], logits[i]), f"{t} rows: row {i}'s logits differ from its decode step"
            assert torch.equal(a1[0], aux[i]), f"{t} rows: row {i}'s features differ from its decode step"


@pytest.mark.parametrize("steps, topk, tokens", [(5, 1, None), (5, 4, 16)])
def test_sampled_graphs_equal_eager_and_host(steps, topk, tokens):
    """(Last in the file: a capture that failed would break the CUDA context for every later test in the
    process.) Sampled rounds and plain sampled blocks replayed from CUDA graphs draw what the same functions draw
    eagerly (float32), and what the host path draws one decision at a time from the same noise; compiled, the
    same seed gives the same tokens again (its kernels may round otherwise than eager)."""
    target = tiny_target(seed=3, initializer_range=0.4).cuda()
    draft = tiny_draft(target).cuda()
    prompts = [[5, 17, 99, 3], list(range(40, 80))]
    outs = {}

    def decode(dec):
        return [(dec.generate(p, 48, seed=s)[0], dec.generate_plain(p, 48, seed=s)[0]) for p in prompts for s in (0, 1)]

    for rounds, graphs, compile in ((False, False, False), (True, False, False), (True, True, False),
                                    (True, True, True)):
        dec = SpecDecoder(target, draft, AUX, max_len=200, spec_steps=steps, topk=topk, num_draft_tokens=tokens,
                          cuda_graphs=graphs, compile=compile, span_step=32, temperature=1.0, device_rounds=rounds)
        outs[rounds, graphs, compile] = decode(dec)
        if compile:
            assert decode(dec) == outs[rounds, graphs, compile]
    host, eager, graphs, _ = outs.values()
    assert graphs == eager
    assert [spec for spec, _ in eager] == [spec for spec, _ in host]
    assert eager[0] != eager[1]  # the seed matters
