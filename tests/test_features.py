"""Online features from forward hooks equal what the target reports when asked for all hidden states."""

import torch

from specforge.eagle3.ttt import soft_labels
from specforge.targets import FeatureCapture, default_aux_layers

from .conftest import tiny_target


def test_hooks_capture_aux_and_final_hidden_states():
    target = tiny_target()
    ids = torch.randint(0, 256, (2, 10))
    att = torch.ones_like(ids)
    att[1, 7:] = 0
    layers = default_aux_layers(target.config.num_hidden_layers)
    assert layers == [2, 4, 5]
    cap = FeatureCapture(target, layers)
    feats = cap.run(ids, att)
    ref = target(input_ids=ids, attention_mask=att, output_hidden_states=True)
    want = torch.cat([ref.hidden_states[j] for j in layers], dim=-1)
    torch.testing.assert_close(feats.aux, want, rtol=0, atol=0)
    # The final norm output times lm_head gives the target's logits.
    torch.testing.assert_close(feats.final @ target.lm_head.weight.T, ref.logits, rtol=1e-6, atol=1e-5)
    assert not feats.aux.requires_grad and not feats.final.requires_grad
    cap.remove()
    assert not any(layer._forward_pre_hooks for layer in target.model.layers)


def test_soft_labels_restricted_to_draft_vocab():
    torch.manual_seed(0)
    final = torch.randn(2, 5, 64, dtype=torch.float64)
    w = torch.randn(256, 64, dtype=torch.float64)
    draft_ids = torch.tensor([0, 3, 7, 100, 255])
    lab = soft_labels(final, w, draft_ids, chunk=3)
    full = final @ w.T
    torch.testing.assert_close(lab.logits, full[..., draft_ids])
    torch.testing.assert_close(lab.lse, torch.logsumexp(full, -1))
    assert torch.equal(lab.argmax, full.argmax(-1))
    needed = torch.rand(2, 5) > 0.5
    part = soft_labels(final, w, draft_ids, needed, chunk=2)
    torch.testing.assert_close(part.logits[needed], lab.logits[needed])
    assert (part.logits[~needed] == 0).all() and torch.equal(part.argmax[needed], lab.argmax[needed])


def test_compiled_target_layers_give_the_eager_features():
    """train.compile_target: each decoder layer's forward compiled (the hooks outside it). A padded row, then a
    packed batch (4-D mask): the features match the eager target's within float32 rounding of fused kernels, one
    graph per kind of mask serves all six layers with no graph break, and closing gives the layers their class
    forward back."""
    import torch._dynamo

    from specforge.eagle3.train import OnlineFeatures
    from specforge.data.batching import Batch

    torch._dynamo.reset()
    target = tiny_target()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    att = torch.ones_like(ids)
    att[1, 9:] = 0
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])  # row 0 packs two conversations
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12).clone()
    position_ids[1] = torch.arange(12)
    batches = [Batch(ids, att, att.bool()),
               Batch(ids, torch.ones_like(ids), att.bool(), doc_ids=doc_ids, position_ids=position_ids)]
    eager = OnlineFeatures(target, [2, 4, 5])
    want = [eager(b) for b in batches]
    eager.close()
    compiled = OnlineFeatures(target, [2, 4, 5], compile_layers=True)
    counts = torch._dynamo.utils.counters
    counts.clear()
    for batch, ref in zip(batches, want):
        for a, b in zip(compiled(batch), ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert not torch.equal(a, torch.zeros_like(a))
    assert not torch.allclose(want[0][0], want[1][0])  # the packed row's second conversation sees only itself
    assert 1 <= counts["stats"]["unique_graphs"] <= 2 and not counts["graph_break"]  # one graph per kind of mask
    assert all("forward" in vars(layer) for layer in target.model.layers)
    compiled.close()
    assert not any("forward" in vars(layer) for layer in target.model.layers)
    assert not any(layer._forward_pre_hooks for layer in target.model.layers)
    torch._dynamo.reset()


def test_right_padded_rows_need_no_mask():
    """OnlineFeatures passes no attention mask for collated (right-padded) rows, so transformers has nothing to
    read on the host: each row's features at its real tokens are those of the row run alone, and those of the
    target given the mask (float64)."""
    from specforge.data.batching import collate
    from specforge.data.template import Sample
    from specforge.eagle3.train import OnlineFeatures

    target = tiny_target(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 256, (n,), generator=g) for n in (12, 7, 3)]
    batch = collate([Sample(r, torch.ones(len(r), dtype=torch.bool)) for r in rows])
    assert batch.attention_mask[1:].eq(0).any()  # padding to ignore
    features = OnlineFeatures(target, [2, 4, 5])
    aux, final = features(batch)
    capture = FeatureCapture(target, [2, 4, 5])
    masked = capture.run(batch.input_ids, batch.attention_mask)
    capture.remove()
    for i, r in enumerate(rows):
        n = len(r)
        alone_aux, alone_final = features(collate([Sample(r, torch.ones(n, dtype=torch.bool))]))
        torch.testing.assert_close(aux[i, :n], alone_aux[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final[i, :n], alone_final[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(aux[i, :n], masked.aux[i, :n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final[i, :n], masked.final[i, :n], rtol=1e-12, atol=1e-12)
    features.close()


def test_unmasked_sdpa_skips_mask_building_and_gives_the_same_bits():
    """With no mask, FeatureCapture runs the decoder under `unmasked_sdpa`: transformers builds no mask at all
    (so reads nothing on the host) and the features are bit for bit those of SDPA given an all-ones mask (which
    it drops after reading it). Targets with sliding-window layers keep their masks."""
    from specforge.targets import UNMASKED_SDPA, causal_only, decoder_model, unmasked_sdpa

    target = tiny_target()
    base = decoder_model(target)
    assert base.config._attn_implementation == "sdpa" and causal_only(base.config)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(7))
    capture = FeatureCapture(target, [2, 4, 5])
    with_mask = capture.run(ids, torch.ones_like(ids))
    with_mask = [with_mask.aux.clone(), with_mask.final.clone()]
    without = capture.run(ids)
    assert torch.equal(without.aux, with_mask[0]) and torch.equal(without.final, with_mask[1])
    capture.remove()
    assert base.config._attn_implementation == "sdpa"  # restored

    # Under unmasked_sdpa transformers builds no mask even when given one: left padding (never used by specforge,
    # whose rows are right-padded) shows it, as the padded row's outputs change.
    left = torch.ones_like(ids)
    left[1, :4] = 0
    masked = base(input_ids=ids, attention_mask=left).last_hidden_state
    with unmasked_sdpa(base):
        assert base.config._attn_implementation == UNMASKED_SDPA
        unmasked = base(input_ids=ids, attention_mask=left).last_hidden_state
    assert torch.equal(unmasked[0], masked[0]) and not torch.allclose(unmasked[1, 4:], masked[1, 4:])
    from transformers import Qwen3Config, Qwen3Model

    sliding = Qwen3Model(Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     use_sliding_window=True, sliding_window=4, max_window_layers=1))
    assert sliding.config._attn_implementation == "sdpa" and not causal_only(sliding.config)
    with unmasked_sdpa(sliding):
        assert sliding.config._attn_implementation == "sdpa"
