"""TTT equals inference: step k of the unroll computes what a chain of k+1 draft tokens computes."""

import pytest
import torch

from specforge.eagle3.ttt import (SoftLabels, next_token_mask, scored_index, shift_left, soft_labels, ttt_loss,
                                  ttt_unroll)

from .conftest import causal_attention, unroll_inputs


class KVCache:
    """Plain growing KV cache (what decoding uses): every query sees all cached keys up to itself."""

    def __init__(self):
        self.k = self.v = None

    def __call__(self, q, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return causal_attention(q, self.k, self.v)


def chain_logits(draft, ids, aux, anchor, depth):
    """Run the draft as a chain from `anchor`: features for positions <= anchor, then `depth` more draft
    tokens fed with the true next tokens. Returns logits at each depth 0..depth."""
    cache = KVCache()
    pos = torch.arange(anchor + 1)[None].expand(ids.shape[0], -1)
    h = draft.layer(draft.embed(ids[:, 1:anchor + 2]), draft.project(aux[:, :anchor + 1]), pos, cache)
    h = h[:, -1:]
    out = [draft.logits(h)[:, 0]]
    for k in range(1, depth + 1):
        tok = ids[:, anchor + 1 + k:anchor + 2 + k]
        h = draft.layer(draft.embed(tok), draft.carry(h), torch.full_like(tok, anchor + k), cache)
        out.append(draft.logits(h)[:, 0])
    return out


@pytest.mark.parametrize("flags", [{}, {"fc_norm": True, "norm_output": True}], ids=["eagle3", "eagle3.1"])
def test_ttt_step_k_equals_chain_depth_k(flags):
    """Also with EAGLE 3.1's norms, which change what step 0 reads (fc_norm) and what each step hands on
    (norm_output): TTT and the chain take them from the same two methods, project and carry."""
    b, t, steps = 2, 14, 5
    draft, ids, aux = unroll_inputs(b, t, **flags)
    ttt = [draft.logits(h) for _, h in ttt_unroll(draft, ids, aux, steps)]
    checked = 0
    for anchor in range(t - 2):
        depth = min(steps - 1, t - 2 - anchor)  # input token anchor+1+k must exist
        for k, logits in enumerate(chain_logits(draft, ids, aux, anchor, depth)):
            torch.testing.assert_close(ttt[k][:, anchor], logits, rtol=1e-9, atol=1e-11)
            checked += 1
    assert checked > 40


def test_ttt_loss_against_direct_computation():
    """Loss and accuracy of step k computed directly from the chain logits, position by position."""
    b, t, steps = 1, 12, 3
    draft, ids, aux = unroll_inputs(b, t, seed=1)
    full = torch.randn(b, t, 256, dtype=torch.float64) * 3
    draft_ids = torch.arange(64) + draft.d2t
    labels = SoftLabels(full[..., draft_ids], torch.logsumexp(full, -1), full.argmax(-1))
    loss_mask = torch.zeros(b, t, dtype=torch.bool)
    loss_mask[:, 4:] = True
    total, stats = ttt_loss(draft, ids, loss_mask, aux, labels, steps, 0.8, mask_out_of_vocab=False)
    want_total = 0.0
    for k in range(steps):
        ces, correct, n = [], 0, 0
        for anchor in range(t):
            p = anchor + 1 + k  # the target position whose distribution the draft matches
            if p + 1 >= t or not loss_mask[0, p + 1]:
                continue
            logits = chain_logits(draft, ids, aux, anchor, k)[k][0]
            soft = torch.softmax(labels.logits[0, p], -1)
            ces.append(-(soft * torch.log_softmax(logits, -1)).sum())
            correct += int(draft_ids[logits.argmax()] == labels.argmax[0, p])
            n += 1
        torch.testing.assert_close(stats[k].loss, torch.stack(ces).mean())
        assert int(stats[k].correct) == correct and int(stats[k].count) == n
        want_total += 0.8 ** k * torch.stack(ces).mean()
    torch.testing.assert_close(total, want_total)


def test_shift_left():
    x = torch.arange(6).view(1, 6)
    assert shift_left(x, 2).tolist() == [[2, 3, 4, 5, 0, 0]]


def random_rows(lengths, scored_from: int, seed: int) -> list:
    """Samples of random token ids (below 5000) of these lengths, trained on from position `scored_from`."""
    from specforge.data.template import Sample

    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[scored_from:] = True
        rows.append(Sample(torch.randint(0, 5000, (n,), generator=g), mask))
    return rows


def test_padding_the_time_axis_changes_nothing(tiny_target_folder):
    """On the GPU batches are right-padded to a multiple of 128 for flex attention: the loss and every
    statistic must be those of the unpadded batch (padding is causal-future and masked)."""
    from specforge.config import load_config
    from specforge.data.batching import collate
    from specforge.eagle3.train import OnlineFeatures, build_draft, run_batch
    from specforge.targets import TargetHead, load_target

    cfg = load_config(str(tiny_target_folder), overrides=["device=cpu", "train.ttt_length=3",
                                                          "target.draft.draft_vocab_size=512"])
    target, _ = load_target(cfg.target, torch.device("cpu"), torch.float64)
    head = TargetHead.from_model(target)
    rows = random_rows((23, 17), scored_from=5, seed=0)
    d2t = torch.zeros(512, dtype=torch.long)
    t2d = torch.zeros(head.embed.weight.shape[0], dtype=torch.bool)
    t2d[:512] = True
    draft = build_draft(cfg, head, [2, 4, 5], d2t, t2d).double()
    features = OnlineFeatures(target, [2, 4, 5])
    draft_ids = torch.arange(512)
    batch = collate(rows)
    padded = batch.pad_to_multiple(16)
    assert padded.input_ids.shape == (2, 32) and padded.num_tokens == batch.num_tokens
    loss, stats = run_batch(cfg, draft, features, head, draft_ids, batch, torch.device("cpu"))
    loss_p, stats_p = run_batch(cfg, draft, features, head, draft_ids, padded, torch.device("cpu"))
    torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(stats, stats_p):
        assert int(a.correct) == int(b.correct) and int(a.count) == int(b.count)
        torch.testing.assert_close(b.accept, a.accept, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eagle31", [False, True], ids=["eagle3", "eagle3.1"])
def test_cpu_autocast_runs_the_draft_step_in_bf16(tiny_target_folder, eagle31):
    """train.cpu_autocast: the CPU step under bf16 autocast, as on CUDA. Its loss and gradients must stay within
    bf16 rounding of the float64 step, and differ from the float32 step's (the matmuls did run in bf16). With
    EAGLE 3.1's norms too (fc_norm; norm_output hands a norm's output to the next step, bf16 under autocast)."""
    import copy
    import dataclasses

    from specforge.config import load_config
    from specforge.data.batching import collate
    from specforge.eagle3.train import OnlineFeatures, build_draft, run_batch
    from specforge.targets import TargetHead, load_target

    flags = [f"target.draft.fc_norm={eagle31}", f"target.draft.norm_output={eagle31}"]
    cfg = load_config(str(tiny_target_folder), overrides=["device=cpu", "train.ttt_length=3",
                                                          "target.draft.draft_vocab_size=512", *flags])
    targets = {dt: load_target(cfg.target, torch.device("cpu"), dt)[0] for dt in (torch.float32, torch.float64)}

    def step(autocast: bool, dtype: torch.dtype):
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cpu_autocast=autocast))
        target = targets[dtype]
        d = copy.deepcopy(draft).to(dtype)
        loss, _ = run_batch(run_cfg, d, OnlineFeatures(target, [2, 4, 5]), TargetHead.from_model(target),
                            torch.arange(512), batch, torch.device("cpu"))
        loss.backward()
        grads = [p.grad.double().flatten() for p in d.parameters() if p.grad is not None]
        return loss.detach().double(), torch.cat(grads)

    d2t = torch.zeros(512, dtype=torch.long)
    t2d = torch.zeros(targets[torch.float32].config.vocab_size, dtype=torch.bool)
    t2d[:512] = True
    torch.manual_seed(0)
    draft = build_draft(cfg, TargetHead.from_model(targets[torch.float32]), [2, 4, 5], d2t, t2d)
    batch = collate(random_rows((40, 29), scored_from=6, seed=1))
    ref_loss, ref_grad = step(False, torch.float64)
    loss32, grad32 = step(False, torch.float32)
    loss16, grad16 = step(True, torch.float32)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(loss32, ref_loss) < 1e-5 and rel(grad32, ref_grad) < 1e-4
    assert 1e-5 < rel(loss16, ref_loss) < 2e-2  # bf16 rounding: present, and small
    assert 1e-4 < rel(grad16, ref_grad) < 5e-2


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_host_made_index_equals_the_masks_bit_for_bit(packed, fused):
    """Training hands `soft_labels` and `ttt_loss` the scored positions as index pairs made on the host
    (`scored_index`), so that the GPU is never asked to count them; the labels, loss, statistics and
    gradients must be those of the mask path exactly (same positions, same order)."""
    b, t, steps = 2, 16, 4
    draft, ids, aux = unroll_inputs(b, t, seed=3)
    g = torch.Generator().manual_seed(3)
    loss_mask = torch.rand(b, t, generator=g) > 0.3
    doc_ids = position_ids = None
    if packed:  # two conversations in row 0, one in row 1, two padding slots at the end of row 1
        doc_ids = torch.tensor([[0] * 7 + [1] * 9, [0] * 14 + [-1] * 2])
        position_ids = torch.tensor([list(range(7)) + list(range(9)), list(range(14)) + [0, 0]])
        loss_mask &= doc_ids >= 0
    final = torch.randn(b, t, draft.config.hidden_size, dtype=torch.float64, generator=g)
    head = torch.randn(256, draft.config.hidden_size, dtype=torch.float64, generator=g)
    draft_ids = torch.arange(64) + draft.d2t
    index = scored_index(loss_mask, doc_ids, steps)
    by_mask = soft_labels(final, head, draft_ids, next_token_mask(loss_mask, doc_ids), chunk=5)
    by_index = soft_labels(final, head, draft_ids, index.needed, chunk=5)
    for name in ("logits", "lse", "argmax"):
        assert torch.equal(getattr(by_mask, name), getattr(by_index, name))

    def run(idx):
        draft.zero_grad(set_to_none=True)
        total, stats = ttt_loss(draft, ids, loss_mask, aux, by_mask, steps, 0.8, fused=fused, loss_chunk=7,
                                doc_ids=doc_ids, position_ids=position_ids, index=idx)
        total.backward()
        return total.detach(), stats, {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}

    (t0, s0, g0), (t1, s1, g1) = run(None), run(index)
    assert torch.equal(t0, t1) and g0.keys() == g1.keys() and len(g0) > 3
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    for a, c in zip(s0, s1):
        assert all(torch.equal(x, y) for x, y in zip((a.loss, a.correct, a.accept, a.count),
                                                      (c.loss, c.correct, c.accept, c.count)))
    assert sum(int(a.count) for a in s0) > 10


def test_draft_activations_travel_in_autocast_dtype():
    """Under bf16 autocast (training: float32 weights), the draft's norms return bf16 and its embeddings and
    features stay bf16: the values a projection reads are the same bits a float32 norm output cast by the
    projection would give, without the float32 copy. Without autocast nothing changes (float32 stays float32,
    float64 exact); under the deterministic switch the swapped formula keeps the rule."""
    from specforge.kernels import batch_invariant as bi
    from specforge.layers import RMSNorm

    from .conftest import tiny_draft, tiny_target

    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64) * 0.3 + 1)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(5, 64) * 4).to(dtype)
        plain = norm(x)
        assert plain.dtype == torch.float32 and torch.equal(plain, norm.formula(x))
        for switch in (False, True):
            with bi.batch_invariant(switch), torch.autocast("cpu", dtype=torch.bfloat16):
                out = norm(x)
            assert out.dtype == torch.bfloat16 and torch.equal(out, plain.to(torch.bfloat16)), (dtype, switch)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # what a projection reads: the same bits
                assert torch.equal(torch.nn.functional.linear(out, torch.eye(64)),
                                   torch.nn.functional.linear(plain, torch.eye(64)))
    x64 = torch.randn(3, 64, dtype=torch.float64)
    ref = norm.weight.double() * (x64 / x64.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    torch.testing.assert_close(norm.double()(x64), ref, rtol=1e-14, atol=1e-14)

    target = tiny_target().to(torch.bfloat16)
    draft = tiny_draft(target, fc_norm=True, norm_output=True)  # every kind of norm the draft has
    ids = torch.randint(0, 256, (2, 9))
    aux = torch.randn(2, 9, 3 * target.config.hidden_size, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeds, hidden = draft.embed(ids), draft.project(aux)
        hiddens = [h for _, h in ttt_unroll(draft, ids, aux, 3)]
    assert embeds.dtype == hidden.dtype == torch.bfloat16
    assert torch.equal(embeds, target.model.embed_tokens(ids))  # the target's bf16 rows as they are
    assert all(h.dtype == torch.bfloat16 for h in hiddens)
    assert draft.embed(ids).dtype == torch.float32 and draft.project(aux).dtype == torch.float32  # no autocast


def _module_unroll(draft, ids, aux, steps):
    """ttt_unroll's steps through the layer's modules (no unroll weights): the reference layout."""
    from specforge.eagle3.ttt import TTTAttention

    hidden, attend = draft.project(aux), TTTAttention("reference")
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    for k in range(steps):
        out = draft.layer(draft.embed(shift_left(ids, k + 1)), hidden, pos + k, attend)
        yield k, out
        hidden = draft.carry(out)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "recomputed"])
def test_unroll_weights_give_the_modules_outputs_and_gradients(checkpointing):
    """The unroll's one-per-batch layout of the projections (q/k/v and gate/up each one matrix) computes what
    the modules compute: float64 outputs and every parameter's gradient to rounding, with activation
    checkpointing too. Under bf16 autocast the layout is bf16 (the cast made once), and the gradients match the
    modules' path to bf16 rounding."""
    draft, ids, aux = unroll_inputs(2, 12, seed=3, fc_norm=True, norm_output=True)
    draft.checkpointing = checkpointing

    def run(unroll, autocast=False):
        draft.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = [h for _, h in unroll(draft, ids, aux, 4)]
            loss = sum((h.double() * torch.linspace(-1, 1, h.shape[-1], dtype=torch.float64)).sin().sum()
                       for h in outs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
        return torch.stack([h.double() for h in outs]), grads

    got, got_g = run(ttt_unroll)
    ref, ref_g = run(_module_unroll)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert got_g.keys() == ref_g.keys() and len(got_g) == 15  # all but lm_head
    for n in ref_g:
        # float64 rounding relative to the largest entry: a small entry carries the error of the sums that made it
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-10, atol=1e-13 * ref_g[n].abs().max().item(), msg=n)

    draft.float()
    aux = aux.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = draft.unroll_weights()
    assert {t.dtype for t in (w.qkv, w.o, w.gate_up, w.down)} == {torch.bfloat16}
    assert w.qkv.shape[0] == sum(w.widths) and w.gate_up.shape[0] == 2 * w.down.shape[1]
    got, got_g = run(ttt_unroll, autocast=True)
    ref, ref_g = run(_module_unroll, autocast=True)
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02)
    for n in ref_g:
        scale = ref_g[n].abs().max()
        assert (got_g[n] - ref_g[n]).abs().max() <= 0.03 * scale, n


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "recomputed"])
def test_weight_sums_in_place_give_autograd_gradients(checkpointing):
    """train.sum_weight_grads: the steps' matmuls add their weight gradients into one buffer per matrix. In
    float64 the outputs are the same bits as autograd's unroll and every parameter's gradient is equal to
    float64 rounding, with activation checkpointing too (the halves recomputed in backward)."""
    draft, ids, aux = unroll_inputs(2, 12, seed=5, fc_norm=True, norm_output=True)
    draft.checkpointing = checkpointing

    def run(sums):
        draft.zero_grad(set_to_none=True)
        outs = [h for _, h in ttt_unroll(draft, ids, aux, 4, sums=sums)]
        loss = sum((h * torch.linspace(-1, 1, h.shape[-1], dtype=torch.float64)).sin().sum() for h in outs)
        loss.backward()
        return torch.stack(outs).detach(), {n: p.grad.clone() for n, p in draft.named_parameters()
                                            if p.grad is not None}

    got, got_g = run(True)
    ref, ref_g = run(False)
    assert torch.equal(got, ref)
    assert got_g.keys() == ref_g.keys() and len(got_g) == 15  # all but lm_head
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-12, atol=1e-13 * ref_g[n].abs().max().item(), msg=n)
    with torch.no_grad():  # no autograd: plain matmuls, nothing summed
        assert not draft.unroll_weights(sums=True).sums


def test_weight_sums_add_in_place_with_one_rounding_per_step():
    """The bf16 sink: the first step's product becomes the buffer and later steps add into it in place (never
    reallocated), and its sum of seven steps is closer to the float64 sum than autograd's (each product
    rounded to bf16, then each add rounded again)."""
    from specforge.eagle3.grad_sums import Sink

    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(96, 48, generator=gen).bfloat16() for _ in range(7)]
    xs = [torch.randn(96, 80, generator=gen).bfloat16() for _ in range(7)]
    sink, autograd_sum, ptrs = Sink(), None, set()
    for g, x in zip(gs, xs):
        sink.add(g, x)
        ptrs.add(sink.total.data_ptr())
        step = g.t().mm(x)
        autograd_sum = step if autograd_sum is None else autograd_sum + step
    exact = sum(g.double().t() @ x.double() for g, x in zip(gs, xs))
    assert sink.total.dtype == torch.bfloat16 and sink.total.shape == (48, 80) and len(ptrs) == 1
    err_sink, err_autograd = (sink.total.double() - exact).norm(), (autograd_sum.double() - exact).norm()
    assert err_sink < 0.9 * err_autograd, (err_sink, err_autograd)
    # each step's rounding is at most half a bf16 ulp of the running sum, which is at most the sum of |products|
    bound = 7 * 2 ** -9 * sum((g.double().t() @ x.double()).abs() for g, x in zip(gs, xs))
    assert ((sink.total.double() - exact).abs() <= bound).all()
