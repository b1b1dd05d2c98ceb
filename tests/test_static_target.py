"""The decoder's target forward over a static KV cache equals the HF model's own forward (float64), for every
family it runs: prefill, a causal block of verify tokens, then single decode steps, logits and aux features
alike, with windows and chunks short enough to cut into the sequence. Then mixture-of-experts targets
through the whole speculative decoder."""

from pathlib import Path

import pytest
import torch
from transformers import (Llama4ForCausalLM, Llama4TextConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from specforge.eagle3.decoder import SpecDecoder
from specforge.static_target import StaticTarget

from .conftest import tiny_draft, tiny_llama_config

AUX = [1, 3, 5]
COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=512, initializer_range=0.1)


def build(family: str, **extra):
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(tiny_llama_config(**{**COMMON, "intermediate_size": 96}))
    elif family == "qwen2":  # biases on q/k/v
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, intermediate_size=96, **extra))
    elif family == "qwen3":  # per-head q/k norms
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, intermediate_size=96, **extra))
    elif family == "qwen3_moe":  # sparse blocks mixed with a dense one
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32,
                                                   num_experts=4, num_experts_per_tok=2, mlp_only_layers=[2]))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**COMMON, intermediate_size=96, **extra))
    elif family == "llama4":  # MoE and dense layers, rope layers chunked, no-rope layers with a query temperature
        model = Llama4ForCausalLM(Llama4TextConfig(
            **COMMON, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=2, no_rope_layer_interval=3, attention_chunk_size=6, floor_scale=4,
            attn_scale=0.5, use_qk_norm=True, **extra))
    else:
        raise ValueError(family)
    if family in ("qwen3_moe", "llama4") and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # the grouped-mm experts take no float64
    return model.double().eval().requires_grad_(False)


@pytest.mark.parametrize("family, extra", [
    ("llama", {}), ("qwen2", {}), ("qwen3", {}), ("qwen3_moe", {}), ("mistral", {"sliding_window": None}),
    ("mistral", {"sliding_window": 7}),  # every layer windowed
    ("qwen3", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 3}),  # layers 3.. windowed
    ("llama4", {})])
@pytest.mark.parametrize("glu", [False, True], ids=["fused-gate-up", "glu-interleaved"])
def test_static_forward_equals_the_hf_forward(family, extra, glu, monkeypatch):
    """`glu`: built with skinny_linear.GLU_EPILOGUE, so the dense SiLU MLPs take interleaved gate/up rows and
    `glu_linear` (its CPU path here)."""
    from specforge.kernels import skinny_linear

    monkeypatch.setattr(skinny_linear, "GLU_EPILOGUE", glu)
    model = build(family, **extra)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 256, (1, 20), generator=g)
    with torch.no_grad():
        ref = model(input_ids=seq, output_hidden_states=True)
    ref_aux = torch.cat([ref.hidden_states[j] for j in AUX], -1)[0]
    st = StaticTarget(model, AUX, max_len=32)
    dense = [g for g in st.gate_up if g is not None]
    assert dense and all((g[2] is None) == glu for g in dense) or family == "qwen3_moe"
    slots = torch.arange(32)
    got_logits, got_aux = [], []
    # 12 tokens of prefill, a causal block of 4 (a chain verify), then 4 decode steps.
    for start, end in [(0, 12), (12, 16)] + [(i, i + 1) for i in range(16, 20)]:
        pos = torch.arange(start, end)
        logits, aux = st(seq[:, start:end], pos[None], pos, (slots[None] <= pos[:, None])[None])
        got_logits.append(logits[0])
        got_aux.append(aux[0])
    # HF computes the rope angles in float32 whatever the model's dtype; the static forward does it in float64
    # for a float64 model. That is the whole of the difference: about 1e-6 here, where a wrong mask, bias or
    # norm shows at 1e-2.
    torch.testing.assert_close(torch.cat(got_logits), ref.logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(got_aux), ref_aux, rtol=0, atol=1e-5)


def test_compiled_prologue_equals_eager(monkeypatch):
    """With COMPILE_PROLOGUE the compiled forward (prologue, layers and head) gives the eager forward's logits
    and features to float64 rounding of inductor's reordered sums, and writes the same slot positions (Llama 4:
    rotation of pairs, chunks, query temperature; a wrong position or angle shows at 1e-2); and
    features=False leaves the logits as they are."""
    import specforge.static_target as static_target

    monkeypatch.setattr(static_target, "COMPILE_PROLOGUE", True)
    torch._dynamo.reset()
    model = build("llama4")
    seq = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    slots = torch.arange(16)
    outs = {}
    for compiled in (False, True):
        st = StaticTarget(model, AUX, max_len=16)
        if compiled:
            st.compile()
        got = []
        for start, end in [(0, 8), (8, 9), (9, 12)]:
            pos = torch.arange(start, end)
            logits, aux = st(seq[:, start:end], pos[None], pos, (slots[None] <= pos[:, None])[None])
            plain, none = st(seq[:, start:end], pos[None], pos, (slots[None] <= pos[:, None])[None], features=False)
            assert none is None and torch.equal(plain, logits)
            got.append((logits, aux))
        outs[compiled] = got, st.slot_positions.clone()
    assert torch.equal(outs[True][1], outs[False][1])
    for (lc, ac), (le, ae) in zip(outs[True][0], outs[False][0]):
        torch.testing.assert_close(lc, le, rtol=0, atol=1e-5)
        torch.testing.assert_close(ac, ae, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4"])
@pytest.mark.parametrize("topk, tokens", [(1, None), (3, 10)])
def test_moe_target_speculative_equals_plain(family, topk, tokens):
    """Qwen3-MoE and Llama 4 (chunks of 6 positions: tree nodes cross chunk boundaries) through the decoder,
    chain and tree, float32: speculative greedy output is plain greedy output."""
    model = build(family).float()
    draft = tiny_draft(model, draft_vocab=256)
    draft.set_vocab(torch.zeros(256, dtype=torch.long), torch.ones(256, dtype=torch.bool))
    dec = SpecDecoder(model, draft, [2, 4, 5], max_len=96, spec_steps=4, topk=topk, num_draft_tokens=tokens)
    for prompt in ([5, 17, 99, 3], [200, 1, 1, 7, 8]):
        plain, _ = dec.generate_plain(prompt, 40)
        spec, stats = dec.generate(prompt, 40)
        assert spec == plain
        assert sum(stats.accept_lengths) == len(spec) - 1


def test_tree_drift_script_builds_paths_that_agree_in_float64(tiny_target_folder):
    """scripts/tree_drift.py compares a tree verify with decode steps along each node's path: in float64 on the
    CPU the two agree to rounding for every node, so its trees, paths, positions and masks are right (in bf16
    on a GPU its counts of bit-equal nodes are then what they say)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tree_drift", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "tree_drift.py")
    tree_drift = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tree_drift)
    parents = tree_drift.random_tree(10, 3, torch.Generator().manual_seed(0))
    assert parents[0] == -1 and all(0 <= p < i for i, p in enumerate(parents) if i)
    depth = [len(p) - 1 for p in tree_drift.paths(parents)]
    assert depth == sorted(depth) and max(depth) >= 2  # laid out depth by depth, deeper than one level
    out = tree_drift.main(["--target", str(tiny_target_folder), "--device", "cpu", "--dtype", "float64",
                           "--context", "20", "--trees", "2", "--tree", "3,10"])
    assert out["chain-like"]["count"] + out["other"]["count"] == 20 and out["other"]["count"] > 0
    for kind in out.values():
        assert kind["max_diff_features"] < 1e-9 and kind["max_diff_logits"] < 1e-9


def test_family_norms_equal_the_fused_kernels_reference():
    """`RMS_NORMS` lists the norms `add_norm_linear` stands in for; its reference (`skinny_linear._add_norm`, which
    the kernel matches) must give each family's HF norm bit for bit in the decode dtypes, with the residual added
    first, and `rms_norm_eps` must read each one's epsilon (HF names it variance_epsilon or eps)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    from specforge.kernels.skinny_linear import _add_norm
    from specforge.layers import RMSNorm
    from specforge.static_target import RMS_NORMS, rms_norm_eps

    classes = [LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm, Qwen3MoeRMSNorm, Llama4TextRMSNorm, RMSNorm]
    assert sorted(c.__name__ for c in classes) == sorted(RMS_NORMS)
    gen = torch.Generator().manual_seed(0)
    for cls in classes:
        eps = 1e-5 if cls is Llama4TextRMSNorm else 1e-6
        norm = cls(96, eps=eps)
        assert rms_norm_eps(norm) == eps, cls.__name__
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            n = norm.to(dtype)
            with torch.no_grad():
                n.weight.copy_(1 + 0.5 * torch.randn(96, generator=gen))
            x = (3 * torch.randn(5, 96, generator=gen)).to(dtype)
            d = torch.randn(5, 96, generator=gen).to(dtype)
            with torch.no_grad():
                got, s = _add_norm(x, d, n.weight, eps)
                assert torch.equal(s, x + d)
                assert torch.equal(got, n(x + d)), (cls.__name__, dtype)
                assert torch.equal(_add_norm(x, None, n.weight, eps)[0], n(x)), (cls.__name__, dtype)


def test_family_mlps_equal_the_glu_reference():
    """`skinny_linear.glu_linear` (GLU_EPILOGUE) stands in for the gate/up half of a gated MLP whose activation is
    in `SILUS`, on interleaved gate/up rows (`interleave_linears`, which leaves the HF module computing what it
    did through strided views). Its reference (HF's eager roundings, which the kernel matches) and its CPU path,
    then the down projection, must give each dense family's HF MLP bit for bit in the decode dtypes."""
    import copy

    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.llama4.modeling_llama4 import Llama4TextMLP
    from transformers.models.mistral.modeling_mistral import MistralMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    from specforge.kernels import skinny_linear as sl
    from specforge.static_target import interleave_linears, is_silu_mlp

    small = dict(hidden_size=64, intermediate_size=96, hidden_act="silu")
    mlps = [LlamaMLP(LlamaConfig(**small)), MistralMLP(MistralConfig(**small)), Qwen2MLP(Qwen2Config(**small)),
            Qwen3MLP(Qwen3Config(**small)), Llama4TextMLP(Llama4TextConfig(**small))]
    gen = torch.Generator().manual_seed(0)
    for mlp in mlps:
        assert is_silu_mlp(mlp), type(mlp).__name__
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            m = mlp.to(dtype)
            x = (2 * torch.randn(5, 64, generator=gen)).to(dtype)
            with torch.no_grad():
                want = m(x)
                views = copy.deepcopy(m)
                w, b, widths = interleave_linears(views.gate_proj, views.up_proj)
                assert widths is None and b is None and w.shape == (192, 64)
                assert torch.equal(views(x), want)  # the module through its strided views
                for glu in (sl.glu_linear_reference, sl.glu_linear):
                    assert torch.equal(m.down_proj(glu(x, w)), want), (type(mlp).__name__, dtype, glu.__name__)
    assert not sl.glu_serves(x, w)  # the CPU: op by op
