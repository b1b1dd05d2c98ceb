"""Shared fixtures: tiny random-weight Llama targets built from real configs, and the embedded tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specforge.config import DraftConfig

os.environ.setdefault("TQDM_DISABLE", "1")
from specforge.eagle3.draft import Eagle3Draft, draft_config, init_draft_weights


def causal_attention(q, k, v):
    """Plain causal attention with grouped kv heads, queries aligned to the last keys: the reference
    attention the tests run the draft with (step 0 over a prefix, then a chain over a growing cache)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    tq, tk = q.shape[-2], k.shape[-2]
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def tiny_llama_config(vocab_size=256, **kw) -> LlamaConfig:
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rms_norm_eps=1e-5, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    base.update(kw)
    return LlamaConfig(**base)


def tiny_target(seed=0, dtype=torch.float32, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).to(dtype).eval()
    model.requires_grad_(False)
    return model


def tiny_draft(target, draft_vocab=64, seed=1, dtype=torch.float32, std=0.2, **sizes) -> Eagle3Draft:
    cfg = draft_config(target.config, DraftConfig(draft_vocab_size=draft_vocab, **sizes),
                       target.config.vocab_size, [2, 4, 5])
    draft = Eagle3Draft(cfg, target.model.embed_tokens)
    init_draft_weights(draft, seed=seed, std=std)
    # A non-trivial vocab map: evenly spaced target ids.
    ids = torch.arange(draft_vocab) * max(1, cfg.vocab_size // draft_vocab)
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab(ids - torch.arange(draft_vocab), t2d)
    return draft.to(dtype)


def unroll_inputs(b: int, t: int, seed: int = 0, **flags):
    """A float64 tiny draft and random (token ids [b, t], aux features [b, t, 3H]) for TTT unroll tests.
    `flags`: the EAGLE 3.1 norms (fc_norm, norm_output); their weights are made random, not ones."""
    draft = tiny_draft(tiny_target(dtype=torch.float64), dtype=torch.float64, **flags)
    if flags:
        with torch.no_grad():
            for name, p in draft.named_parameters():
                if p.dim() == 1:
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    torch.manual_seed(seed)
    ids = torch.randint(0, 256, (b, t))
    return draft, ids, torch.randn(b, t, 3 * draft.config.hidden_size, dtype=torch.float64)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded default's real tokenizer and chat template."""
    from transformers import AutoTokenizer

    from specforge.targets import embedded_smollm2_folder

    return AutoTokenizer.from_pretrained(embedded_smollm2_folder())


@pytest.fixture(scope="session")
def tiny_target_folder(tmp_path_factory, smol_tokenizer):
    """A random-weight Llama of real structure with the SmolLM2 tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    # A large init makes the target's next-token distributions peaked, as a trained model's are.
    model = tiny_target(vocab_size=len(smol_tokenizer), tie_word_embeddings=True, initializer_range=0.5)
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder
