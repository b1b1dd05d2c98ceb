"""The draft forward against a plain float64 reference, and the serving checkpoint round trip."""

import json

import pytest
import torch
from safetensors.torch import load_file

from specforge.eagle3.checkpoint import load_draft, save_draft

from .conftest import causal_attention, tiny_draft, tiny_target


def reference_draft_logits(sd, embed_w, ids_next, aux, cfg):
    """EAGLE-3 step 0 written out by hand from the method description (float64, dense causal mask)."""

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    t = ids_next.shape[1]
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if "fc_norm.0.weight" in sd:  # EAGLE 3.1: each aux layer's features normalised on their own
        aux = torch.cat([rms(c, sd[f"fc_norm.{i}.weight"]) for i, c in enumerate(aux.chunk(3, -1))], -1)
    g = aux @ sd["fc.weight"].T
    e = embed_w[ids_next]
    x = torch.cat([rms(e, sd["midlayer.input_layernorm.weight"]), rms(g, sd["midlayer.hidden_norm.weight"])], -1)
    q = (x @ sd["midlayer.self_attn.q_proj.weight"].T).view(1, t, nh, d).transpose(1, 2)
    k = (x @ sd["midlayer.self_attn.k_proj.weight"].T).view(1, t, nkv, d).transpose(1, 2)
    v = (x @ sd["midlayer.self_attn.v_proj.weight"].T).view(1, t, nkv, d).transpose(1, 2)
    theta = cfg.rope_parameters["rope_theta"]
    # Rope frequencies as HF computes them (float32), angles in float64.
    inv = (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).double()
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(z):
        return z * cos + torch.cat([-z[..., d // 2:], z[..., : d // 2]], -1) * sin

    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    s = q @ k.transpose(-1, -2) / d ** 0.5
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(1, t, nh * d)
    h = g + o @ sd["midlayer.self_attn.o_proj.weight"].T
    y = rms(h, sd["midlayer.post_attention_layernorm.weight"])
    gate = y @ sd["midlayer.mlp.gate_proj.weight"].T
    up = y @ sd["midlayer.mlp.up_proj.weight"].T
    h = h + (torch.nn.functional.silu(gate) * up) @ sd["midlayer.mlp.down_proj.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["lm_head.weight"].T


def _step0_logits(draft, ids_next, aux, w=None):
    pos = torch.arange(ids_next.shape[1])[None]
    h = draft.layer(draft.embed(ids_next), draft.project(aux, w), pos, causal_attention, w)
    return draft.logits(h, w)


@pytest.mark.parametrize("flags", [{}, {"fc_norm": True, "norm_output": True}], ids=["eagle3", "eagle3.1"])
def test_draft_forward_matches_reference(flags):
    target = tiny_target(dtype=torch.float64)
    draft = tiny_draft(target, dtype=torch.float64, **flags)
    with torch.no_grad():  # norm weights other than ones, so that each one counts
        for p in draft.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, dtype=p.dtype))
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, 20))
    aux = torch.randn(1, 20, 3 * 64, dtype=torch.float64) * torch.tensor([1.0, 5.0, 30.0]).repeat_interleave(64)
    ours = _step0_logits(draft, ids, aux)
    sd = {k: v for k, v in draft.state_dict().items()}
    assert ("fc_norm.2.weight" in sd) == bool(flags)
    ref = reference_draft_logits(sd, target.model.embed_tokens.weight, ids, aux, draft.config)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # Decoding's layout (q/k/v and gate/up fused, every projection through skinny_linear, which is F.linear
    # here) computes the same step; it is a copy, so changing a parameter later leaves it as it was.
    w = draft.decode_weights()
    torch.testing.assert_close(_step0_logits(draft, ids, aux, w), ref, rtol=1e-10, atol=1e-10)
    assert w.qkv.shape == (sum(w.widths), 128) and w.gate_up.shape[0] == 2 * draft.config.intermediate_size
    before = w.qkv.clone()
    with torch.no_grad():
        draft.midlayer.self_attn.q_proj.weight.add_(1.0)
    assert torch.equal(w.qkv, before)
    # What a step hands to the next: the layer's output, or with norm_output its post-`norm` value.
    h = torch.randn(1, 5, 64, dtype=torch.float64) * 7
    rms = sd["norm.weight"] * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + draft.config.rms_norm_eps)
    torch.testing.assert_close(draft.carry(h), rms if flags else h, rtol=1e-12, atol=1e-12)


def test_target_ids_follow_the_vocab_map_and_its_device():
    """`target_ids()`: the target id of every draft id (here the evenly spaced ids tiny_draft maps to), equal to
    `draft_to_target` of all draft ids, on d2t's device (the meta device stands in for a GPU)."""
    draft = tiny_draft(tiny_target())
    step = draft.config.vocab_size // 64
    assert torch.equal(draft.target_ids(), torch.arange(64) * step)
    assert torch.equal(draft.target_ids(), draft.draft_to_target(torch.arange(64)))
    draft.d2t = draft.d2t.to("meta")
    assert draft.target_ids().device.type == "meta"


def test_embeddings_shared_and_frozen():
    target = tiny_target()
    draft = tiny_draft(target)
    assert draft.embed_tokens is target.model.embed_tokens
    names = [n for n, _ in draft.named_parameters()]
    assert not any("embed" in n for n in names)
    assert "embed_tokens.weight" not in draft.state_dict()
    assert not draft.embed_tokens.weight.requires_grad


def test_export_reload_identical_logits_and_format(tmp_path):
    target = tiny_target()
    draft = tiny_draft(target)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 16))
    aux = torch.randn(2, 16, 192)
    # float32 export: bit-identical reload.
    save_draft(draft, tmp_path / "f32", dtype=torch.float32)
    again = load_draft(tmp_path / "f32", target.model.embed_tokens)
    assert torch.equal(_step0_logits(draft, ids, aux), _step0_logits(again, ids, aux))
    assert torch.equal(again.d2t, draft.d2t) and torch.equal(again.t2d, draft.t2d)
    # bf16 export (the default): equal to the model with its weights rounded to bf16.
    save_draft(draft, tmp_path / "bf16")
    rounded = tiny_draft(target)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    reloaded = load_draft(tmp_path / "bf16", target.model.embed_tokens)
    assert torch.equal(_step0_logits(rounded, ids, aux), _step0_logits(reloaded, ids, aux))

    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert cfg["vocab_size"] == 256 and cfg["draft_vocab_size"] == 64 and cfg["head_dim"] == 16
    # [2, 4, 5] are the default layers of the 8-layer target: no ids, which both engines read as those.
    assert cfg["eagle_config"] == {"use_aux_hidden_state": True} and cfg["specforge"]["num_target_layers"] == 8
    assert cfg["torch_dtype"] == "bfloat16"
    h, hd, nh, nkv, inter = 64, 16, 4, 2, 128
    expected = {
        "fc.weight": ([h, 3 * h], torch.bfloat16),
        "midlayer.input_layernorm.weight": ([h], torch.bfloat16),
        "midlayer.hidden_norm.weight": ([h], torch.bfloat16),
        "midlayer.post_attention_layernorm.weight": ([h], torch.bfloat16),
        "midlayer.self_attn.q_proj.weight": ([nh * hd, 2 * h], torch.bfloat16),
        "midlayer.self_attn.k_proj.weight": ([nkv * hd, 2 * h], torch.bfloat16),
        "midlayer.self_attn.v_proj.weight": ([nkv * hd, 2 * h], torch.bfloat16),
        "midlayer.self_attn.o_proj.weight": ([h, nh * hd], torch.bfloat16),
        "midlayer.mlp.gate_proj.weight": ([inter, h], torch.bfloat16),
        "midlayer.mlp.up_proj.weight": ([inter, h], torch.bfloat16),
        "midlayer.mlp.down_proj.weight": ([h, inter], torch.bfloat16),
        "norm.weight": ([h], torch.bfloat16),
        "lm_head.weight": ([64, h], torch.bfloat16),
        "d2t": ([64], torch.int64),
        "t2d": ([256], torch.bool),
    }
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {k: (list(v.shape), v.dtype) for k, v in tensors.items()} == expected


def test_speculators_layout_loads(tmp_path):
    target = tiny_target()
    draft = tiny_draft(target)
    save_draft(draft, tmp_path / "spec", dtype=torch.float32, layout="speculators",
               verifier={"name_or_path": "tiny", "architectures": ["LlamaForCausalLM"]})
    cfg = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert cfg["architectures"] == ["Eagle3Speculator"]
    assert cfg["speculators_config"]["algorithm"] == "eagle3"
    again = load_draft(tmp_path / "spec", target.model.embed_tokens)
    ids, aux = torch.randint(0, 256, (1, 8)), torch.randn(1, 8, 192)
    assert torch.equal(_step0_logits(draft, ids, aux), _step0_logits(again, ids, aux))


def test_rope_scaling_and_wide_heads_round_trip(tmp_path):
    """A Llama-3-style target (llama3 rope scaling, head_dim * heads != hidden, untied lm_head)."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    target = tiny_target(head_dim=32, rope_parameters=rope, max_position_embeddings=512)
    draft = tiny_draft(target)
    assert draft.config.head_dim == 32 and draft.midlayer.self_attn.q_proj.weight.shape == (128, 128)
    # The draft's rope frequencies are the target's (scaled), not the plain ones.
    torch.testing.assert_close(draft.rotary_emb.inv_freq, target.model.rotary_emb.inv_freq)
    save_draft(draft, tmp_path / "d", dtype=torch.float32)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["rope_scaling"]["factor"] == 8.0 and cfg["head_dim"] == 32
    again = load_draft(tmp_path / "d", target.model.embed_tokens)
    torch.testing.assert_close(again.rotary_emb.inv_freq, draft.rotary_emb.inv_freq)
    ids, aux = torch.randint(0, 256, (1, 40)), torch.randn(1, 40, 192)
    assert torch.equal(_step0_logits(draft, ids, aux), _step0_logits(again, ids, aux))


def test_activation_checkpointing_gives_the_same_gradients():
    """train.grad_checkpoint recomputes the layer's halves in backward: same loss and gradients, float64."""
    from specforge.eagle3.ttt import ttt_unroll

    target = tiny_target(dtype=torch.float64)
    grads = []
    for ckpt in (False, True):
        draft = tiny_draft(target, dtype=torch.float64)
        draft.checkpointing = ckpt
        ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
        aux = torch.randn(2, 19, 3 * 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        total = sum(h.square().mean() for _, h in ttt_unroll(draft, ids, aux, 3))
        total.backward()
        grads.append((total.detach(), {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}))
    assert torch.equal(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys() and len(grads[0][1]) >= 10
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-12, atol=1e-14, msg=n)
