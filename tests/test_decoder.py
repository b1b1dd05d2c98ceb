"""Speculative decoding: lossless greedy output, rollback, distribution-exact sampling, full acceptance."""

import copy

import pytest
import torch

from specforge.eagle3.acceptance import chain_accept_lengths, match_lengths
from specforge.eagle3.decoder import TARGET_LANE, SpecDecoder, Tree
from specforge.static_target import StaticTarget
from specforge.eagle3.ttt import SoftLabels, ttt_loss

from .conftest import tiny_draft, tiny_target

AUX = [2, 4, 5]


@pytest.fixture(scope="module")
def target():
    # A large init gives peaked, repetitive greedy continuations, as small real models have.
    return tiny_target(seed=3, initializer_range=0.4)


@pytest.fixture(scope="module")
def trained_draft(target):
    """A draft trained for a moment on the target's own greedy continuations (real TTT loss), so that
    rounds accept some tokens and reject others."""
    return train_draft(target)


@pytest.fixture(scope="module")
def eagle31_draft(target):
    """The same with EAGLE 3.1's norm_output (the GPU recipe's): decoding must hand each step what TTT handed it
    (`carry`). (With fc_norm too, 150 steps leave this tiny target's rounds accepting no draft token at all.)"""
    return train_draft(target, norm_output=True)


def train_draft(target, **flags):
    torch.manual_seed(0)
    prompts = [torch.randint(0, 256, (6,)).tolist() for _ in range(12)]
    dec = SpecDecoder(target, tiny_draft(target), AUX, max_len=128)
    seqs = torch.tensor([p + dec.generate_plain(p, 40)[0] for p in prompts])
    draft = tiny_draft(target, draft_vocab=256, std=0.05, **flags)
    draft.set_vocab(torch.zeros(256, dtype=torch.long), torch.ones(256, dtype=torch.bool))
    out = target(input_ids=seqs, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[j] for j in AUX], -1)
    labels = SoftLabels(out.logits, torch.logsumexp(out.logits, -1), out.logits.argmax(-1))
    mask = torch.ones_like(seqs, dtype=torch.bool)
    opt = torch.optim.Adam(draft.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = ttt_loss(draft, seqs, mask, aux, labels, steps=4)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return draft.requires_grad_(False)


PROMPTS = [[5, 17, 99, 3], [200, 1, 1, 7, 8, 9, 10], [42], [13, 250, 77, 77, 12, 0]]


@pytest.mark.parametrize("steps, topk, tokens, device_rounds", [
    (1, 1, None, True), (3, 1, None, True), (5, 1, None, True), (3, 1, None, False), (5, 1, None, False),
    (3, 2, 6, False), (4, 3, 10, False), (5, 4, 16, False), (3, 2, 6, True), (4, 3, 10, True), (5, 4, 16, True),
    (5, 2, 4, True), (2, 3, 10, True)])
def test_greedy_speculative_equals_plain_greedy(target, trained_draft, steps, topk, tokens, device_rounds):
    # span_step=16: rounds attend over the filled slots rounded up to 16, several spans per generation.
    dec = SpecDecoder(target, trained_draft, AUX, max_len=160, spec_steps=steps, topk=topk, num_draft_tokens=tokens,
                      device_rounds=device_rounds, span_step=16)
    lengths = []
    for p in PROMPTS:
        plain, _ = dec.generate_plain(p, 60)
        spec, stats = dec.generate(p, 60)
        assert spec == plain
        assert dec._span < dec.target.k_cache.shape[3]  # the last round read part of the cache only
        lengths += stats.accept_lengths
    # Both outcomes happen: some rounds accept draft tokens, some reject all.
    assert max(lengths) > 1 and min(lengths) == 1
    assert sum(lengths) == sum(len(dec.generate(p, 60)[0]) - 1 for p in PROMPTS)


@pytest.mark.parametrize("steps, topk, tokens, kind", [(5, 4, 16, "eagle3"), (4, 3, 10, "eagle3"), (3, 2, 7, "eagle3"),
                                                     (5, 2, 4, "eagle3"), (5, 4, 16, "eagle3.1")])
def test_device_tree_is_the_host_tree(target, trained_draft, eagle31_draft, steps, topk, tokens, kind):
    """The device tree round builds, node for node, the tree of the host-side `_propose` (the readable
    reference), and accepts the same path, in every round of a whole generation."""
    draft = trained_draft if kind == "eagle3" else eagle31_draft
    dec = SpecDecoder(target, draft, AUX, max_len=160, spec_steps=steps, topk=topk, num_draft_tokens=tokens)
    host_propose, device_propose = dec._propose, dec._propose_on_device
    seen = []

    def propose_both(root, root_hidden, n_t):
        n = int(n_t)
        snapshot = dec.dk.clone(), dec.dv.clone()
        tree = host_propose(int(root), root_hidden, n)
        dec.dk.copy_(snapshot[0])
        dec.dv.copy_(snapshot[1])
        tokens, parents, depths = device_propose(root, root_hidden, n_t)
        assert tokens.tolist() == tree.tokens.tolist()
        assert parents.tolist() == tree.parents
        assert depths.tolist() == tree.depths.tolist()
        seen.append((tree, n))
        return tokens, parents, depths

    dec._propose_on_device = propose_both
    device_lengths, host_lengths = [], []
    for p in PROMPTS:
        device_lengths += dec.generate(p, 50)[1].accept_lengths
    dec.device_rounds = False
    for p in PROMPTS:
        host_lengths += dec.generate(p, 50)[1].accept_lengths
    assert device_lengths == host_lengths and max(host_lengths) > 1
    assert len(seen) == len(device_lengths)


@pytest.mark.parametrize("topk, tokens", [(1, None), (3, 10)])
def test_rounds_ahead_give_the_rounds_read_one_by_one(target, trained_draft, topk, tokens):
    """With one span for every cache length, the next round starts before the last one's summary is read: the
    same tokens and accept lengths as reading each round first, and plain greedy's tokens; a turn that ends on
    an end of sequence has run one round more than it reads (the launch ahead happened)."""
    runs = {}
    for ahead in (False, True):
        dec = SpecDecoder(target, trained_draft, AUX, max_len=160, spec_steps=4, topk=topk, num_draft_tokens=tokens,
                          span_step=1024, rounds_ahead=ahead)
        calls = []
        for name in ("_chain_round", "_tree_round"):
            fn = getattr(dec, name)
            setattr(dec, name, lambda *a, fn=fn: (calls.append(1), fn(*a))[1])
        got = []
        for p in PROMPTS:
            plain, _ = dec.generate_plain(p, 60)
            eos = plain[len(plain) // 2]  # ends the turn halfway through
            for eos_id in (None, eos):
                before = len(calls)
                out, stats = dec.generate(p, 60, eos_id=eos_id)
                want = plain if eos_id is None else plain[:plain.index(eos) + 1]
                assert out == want
                got.append((out, stats.accept_lengths, len(calls) - before - len(stats.accept_lengths)))
        runs[ahead] = got
    assert [g[:2] for g in runs[True]] == [g[:2] for g in runs[False]]
    assert all(g[2] == 0 for g in runs[False])
    # Budget-ended turns waste nothing; a turn ended by its end of sequence ran at most one round unread.
    assert [g[2] for g in runs[True][0::2]] == [0] * len(PROMPTS)
    assert set(g[2] for g in runs[True][1::2]) <= {0, 1} and sum(g[2] for g in runs[True][1::2]) > 0


@pytest.mark.parametrize("span_step, end_early", [(128, False), (1024, True)])
def test_rollback_leaves_caches_as_a_fresh_run(target, trained_draft, span_step, end_early):
    """(1024, True): one span for every length, so rounds run one ahead; the turn ends on an end of sequence,
    after which the round launched ahead has written past the kept length."""
    # float64, so that "equal" can be checked to rounding whatever the number of tokens per forward.
    target = copy.deepcopy(target).double()
    trained_draft = copy.deepcopy(trained_draft).double()
    trained_draft.set_embed_tokens(target.model.embed_tokens)
    dec = SpecDecoder(target, trained_draft, AUX, max_len=160, spec_steps=4, topk=2, num_draft_tokens=8,
                      span_step=span_step)
    runs = [(p, *dec.generate(p, 50)) for p in PROMPTS]
    # A prompt whose rounds both accepted and rejected draft tokens.
    prompt, out, stats = next(r for r in runs if min(r[2].accept_lengths) < max(r[2].accept_lengths))
    if end_early:
        out, _ = dec.generate(prompt, 50, eos_id=out[len(out) // 2])
    else:
        dec.generate(prompt, 50)
    n = dec.cache_len
    seq = (prompt + out)[:n]
    fresh = StaticTarget(target, AUX, 200)
    idx = torch.arange(n)
    fresh(torch.tensor([seq]), idx[None], idx, (torch.arange(200)[None] <= idx[:, None])[None])
    torch.testing.assert_close(dec.target.k_cache[..., :n, :], fresh.k_cache[..., :n, :], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dec.target.v_cache[..., :n, :], fresh.v_cache[..., :n, :], rtol=1e-10, atol=1e-10)
    # The draft's step-0 entries equal a fresh draft pass over the same positions and target features.
    m = dec.draft_len
    feats = fresh(torch.tensor([seq]), idx[None], idx, (torch.arange(200)[None] <= idx[:, None])[None])[1]
    fresh_dec = SpecDecoder(target, trained_draft, AUX, max_len=160, spec_steps=4, topk=2, num_draft_tokens=8)
    fresh_dec._draft_prefill(feats[0, :m], torch.tensor(seq[1:m + 1]), 0, m)
    torch.testing.assert_close(dec.dk[..., :m, :], fresh_dec.dk[..., :m, :], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [2, 9, 16, 17, 30])
def test_padded_prompt_equals_unpadded(target, trained_draft, length):
    """A prompt padded to a multiple of `prompt_step` (as under CUDA graphs, one graph per padded length) gives
    the unpadded prefill's logits, features, draft output and cache entries (float64), and the same decode."""
    target = copy.deepcopy(target).double()
    draft = copy.deepcopy(trained_draft).double()
    draft.set_embed_tokens(target.model.embed_tokens)
    prompt = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    got = []
    for step in (1, 8):
        dec = SpecDecoder(target, draft, AUX, max_len=64, spec_steps=3, topk=2, num_draft_tokens=6)
        dec.prompt_step = step
        logits, aux = dec._prefill(prompt)
        h = dec._draft_prefill(aux, torch.tensor(prompt[1:] + [7]), 0, length)
        got.append((logits, aux, h, dec.target.k_cache[..., :length, :].clone(), dec.dk[..., :length, :].clone()))
        got[-1] += (dec.generate(prompt, 20)[0], dec.generate_plain(prompt, 20)[0])
    (*want, spec, plain), (*padded, spec_p, plain_p) = got
    assert padded[1].shape == want[1].shape == (length, 3 * target.config.hidden_size)
    for a, b in zip(padded, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert spec_p == spec == plain == plain_p


def oracle_propose(dec, target, seq_ref):
    """A proposer that is given the target's own answer: its chain is the target's greedy continuation."""

    def propose(root_token, root_hidden, n):
        seq = seq_ref[0][:n] + [root_token]
        chain = [root_token]
        for _ in range(dec.spec_steps):
            logits = target(input_ids=torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
            chain.append(seq[-1])
        return Tree(torch.tensor(chain), list(range(-1, dec.spec_steps)), torch.arange(dec.spec_steps + 1))

    return propose


@pytest.mark.parametrize("steps", [1, 3, 5])
@pytest.mark.parametrize("device_rounds", [True, False])
def test_oracle_draft_reaches_full_acceptance(target, trained_draft, steps, device_rounds):
    dec = SpecDecoder(target, trained_draft, AUX, max_len=160, spec_steps=steps, device_rounds=device_rounds)
    prompt = PROMPTS[0]
    plain, _ = dec.generate_plain(prompt, 40)
    seq_ref = [prompt + plain]
    oracle = oracle_propose(dec, target, seq_ref)
    dec._propose = oracle
    dec._propose_chain = lambda root, hidden, n_t: oracle(int(root), hidden, int(n_t)).tokens
    spec, stats = dec.generate(prompt, 40)
    assert spec == plain
    assert all(a == steps + 1 for a in stats.accept_lengths[:-1])


@pytest.mark.parametrize("topk, nodes", [(1, None), (3, 7)])
def test_speculative_sampling_matches_target_distribution(topk, nodes):
    """Marginals of the 2nd and 3rd sampled tokens against the exact target distribution (enumerated),
    by a chi-square test, for a sampled chain and a tree of top-k candidates (the device rounds; the host path
    draws the same tokens, `test_sampled_device_rounds_are_the_host_path`). The draft is random and its
    vocab covers half the target's, so draft tokens are often rejected and tokens outside the draft vocab
    come only from the residual or the bonus."""
    target = tiny_target(seed=5, vocab_size=16, initializer_range=0.15)
    draft = tiny_draft(target, draft_vocab=8, std=0.3)
    prompt, temp = [3, 7, 1], 1.0
    with torch.no_grad():
        p1 = torch.softmax(target(input_ids=torch.tensor([prompt])).logits[0, -1] / temp, -1)
        two = torch.tensor([prompt + [a] for a in range(16)])
        p2 = torch.softmax(target(input_ids=two).logits[:, -1] / temp, -1)  # [t1, t2]
        three = torch.tensor([prompt + [a, b] for a in range(16) for b in range(16)])
        p3 = torch.softmax(target(input_ids=three).logits[:, -1] / temp, -1).view(16, 16, 16)
    joint12 = p1[:, None] * p2
    want2 = joint12.sum(0)
    want3 = (joint12[..., None] * p3).sum((0, 1))
    dec = SpecDecoder(target, draft, AUX, max_len=32, spec_steps=2, topk=topk, num_draft_tokens=nodes,
                      temperature=temp)
    n = 2500
    got2, got3 = torch.zeros(16), torch.zeros(16)
    lengths = []
    for seed in range(n):
        out, stats = dec.generate(prompt, 3, seed=seed)
        lengths += stats.accept_lengths
        got2[out[1]] += 1
        got3[out[2]] += 1
    for got, want in ((got2, want2), (got3, want3)):
        expected = want.double() * n
        keep = expected > 5
        chi2 = (((got.double() - expected) ** 2 / expected)[keep]).sum()
        assert chi2 < 40.0, (chi2, got, expected)  # 15 dof: p < 0.001 at 37.7
    if topk > 1:  # some rounds accepted draft tokens, so the test saw the tree path, not only bonus tokens
        assert max(lengths) > 1
    # The same seed gives the same tokens.
    assert dec.generate(prompt, 8, seed=11)[0] == dec.generate(prompt, 8, seed=11)[0]


@pytest.mark.parametrize("steps, topk, tokens, temperature", [(4, 1, None, 1.0), (3, 1, None, 0.6), (4, 3, 10, 1.0),
                                                              (5, 4, 16, 0.6)])
def test_sampled_device_rounds_are_the_host_path(target, trained_draft, steps, topk, tokens, temperature):
    """Sampled rounds on the device (fixed shapes, every decision vectorised) draw, round by round, what the
    host path draws one decision at a time from the same noise: the same tokens and accept lengths for every
    prompt and seed, chain and tree. The noise is keyed by position, so the rounds may fall anywhere."""
    dec = SpecDecoder(target, trained_draft, AUX, max_len=160, spec_steps=steps, topk=topk, num_draft_tokens=tokens,
                      temperature=temperature)
    runs = {}
    for device_rounds in (True, False):
        dec.device_rounds = device_rounds
        runs[device_rounds] = [dec.generate(p, 40, seed=seed) for p in PROMPTS for seed in (0, 1)]
    for (d_out, d_stats), (h_out, h_stats) in zip(runs[True], runs[False]):
        assert d_out == h_out
        assert d_stats.accept_lengths == h_stats.accept_lengths
    lengths = [a for _, st in runs[True] for a in st.accept_lengths]
    assert max(lengths) > 1 and min(lengths) == 1  # rounds that accepted draft tokens, and rounds that did not
    assert runs[True][0][0] != runs[True][1][0]  # another seed, other tokens


def test_sampled_plain_decoding_draws_each_token_from_its_position(target, trained_draft):
    """Plain sampled decoding in blocks of steps on the device is, token for token, the plain reference: the HF
    model's logits over the whole sequence so far (float64), divided by T, plus the Gumbel noise of the token's
    position, argmax. Blocks of 1 and of 4 give the same tokens; so does decoding the same seed again."""
    t64 = copy.deepcopy(target).double()
    draft = copy.deepcopy(trained_draft).double()
    draft.set_embed_tokens(t64.model.embed_tokens)
    temp, prompt = 0.8, PROMPTS[1]
    got = {}
    for block in (1, 4):
        dec = SpecDecoder(t64, draft, AUX, max_len=64, temperature=temp, plain_block=block)
        got[block] = dec.generate_plain(prompt, 30, seed=3)[0]
    assert got[1] == got[4] == dec.generate_plain(prompt, 30, seed=3)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            logits = t64(input_ids=torch.tensor([seq])).logits[0, -1:]
            seq.append(int(dec._gumbel_pick(logits / temp, torch.tensor([len(seq)]), TARGET_LANE, dec._token_hash)))
    assert got[4] == seq[len(prompt):]
    assert got[4] != dec.generate_plain(prompt, 30, seed=4)[0]


@pytest.mark.parametrize("kind", ["eagle3", "eagle3.1"])
def test_one_unroll_estimates_every_chain_length(target, trained_draft, eagle31_draft, kind):
    """The acceptance lengths of chains of 1..5 steps, replayed from one TTT unroll of the draft over the plain
    greedy text, are those the decoder gets, round by round (float64, so no rounding can flip a choice). With
    EAGLE 3.1's norms too: training and decoding must hand each draft step the same state."""
    target = copy.deepcopy(target).double()
    draft = copy.deepcopy(trained_draft if kind == "eagle3" else eagle31_draft).double()
    draft.set_embed_tokens(target.model.embed_tokens)
    plain_dec = SpecDecoder(target, draft, AUX, max_len=160, spec_steps=5)
    checked = 0
    for p in PROMPTS:
        plain, _ = plain_dec.generate_plain(p, 50)
        matches = match_lengths(plain_dec.target, draft, p + plain, 5)
        for steps in range(1, 6):
            dec = SpecDecoder(plain_dec.target, draft, AUX, max_len=160, spec_steps=steps)
            spec, stats = dec.generate(p, 50)
            assert chain_accept_lengths(matches, len(p), len(plain), steps) == stats.accept_lengths
            checked += max(stats.accept_lengths) > 1
    assert checked  # some chains accepted draft tokens


@pytest.mark.parametrize("topk, tokens, temperature", [(1, None, 0.0), (3, 8, 0.0), (1, None, 1.0), (3, 8, 1.0)])
def test_compiled_decoder_equals_eager(target, eagle31_draft, topk, tokens, temperature):
    """torch.compile'd forwards (the GPU default; inductor's CPU backend here): the draft's carry and head fused
    into its compiled functions give the eager decoder's accept lengths, and greedy gives plain greedy's
    tokens; sampled, the compiled draws (noise, acceptance, residual) are the eager ones."""
    got = {}
    for compile in (False, True):
        dec = SpecDecoder(target, eagle31_draft, AUX, max_len=160, spec_steps=4, topk=topk, num_draft_tokens=tokens,
                          compile=compile, span_step=1024, temperature=temperature)
        got[compile] = [dec.generate(p, 50) for p in PROMPTS]
        if temperature == 0:
            for p, (out, _) in zip(PROMPTS, got[compile]):
                assert out == dec.generate_plain(p, 50)[0]
    assert [out for out, _ in got[False]] == [out for out, _ in got[True]]
    lengths = [[s.accept_lengths for _, s in got[c]] for c in (False, True)]
    assert lengths[0] == lengths[1] and max(max(x) for x in lengths[1]) > 1
