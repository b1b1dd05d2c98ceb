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
}


def random_target(shape: str, device, dtype=torch.bfloat16, num_layers: int | None = None, seed: int = 0):
    """An HF LlamaForCausalLM of a real shape, built directly on the device with N(0, 0.02) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if num_layers:
        kw["num_hidden_layers"] = num_layers
    cfg = LlamaConfig(architectures=["LlamaForCausalLM"], **kw)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # to_empty left the rope frequency buffers uninitialised: build that module afresh.
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(device)
    return model.eval().requires_grad_(False)
