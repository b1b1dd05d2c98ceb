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
    """train.compile_target: each decoder layer's forward compiled (the hooks outside it). Real input, a padded
    row and a packed (4-D mask) batch; the features match the eager target's within float32 rounding of a
    fused kernel, every layer runs the compiled code, and closing gives the layers their class forward back."""
    import torch._dynamo

    from specforge.eagle3.train import OnlineFeatures
    from specforge.data.batching import Batch

    torch._dynamo.reset()
    target = tiny_target()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    att = torch.ones_like(ids)
    att[1, 9:] = 0
    batch = Batch(ids, att, att.bool())
    eager = OnlineFeatures(target, [2, 4, 5])
    want = eager(batch)
    eager.close()
    compiled = OnlineFeatures(target, [2, 4, 5], compile_layers=True)
    counts = torch._dynamo.utils.counters
    counts.clear()
    got = compiled(batch)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.equal(a, torch.zeros_like(a))
    assert counts["stats"]["unique_graphs"] >= 1 and not counts["graph_break"]
    assert all("forward" in vars(layer) for layer in target.model.layers)
    compiled.close()
    assert not any("forward" in vars(layer) for layer in target.model.layers)
    assert not any(layer._forward_pre_hooks for layer in target.model.layers)
    torch._dynamo.reset()
