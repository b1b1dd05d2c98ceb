"""Batched generation on a GPU: the decode steps replayed from CUDA graphs (several spans, greedy and sampled
rows, batches sharing one cache) write what eager execution writes, and HF `generate` on each prompt alone
agrees at greedy (float32). Skipped without CUDA."""

import pytest
import torch

from specforge.generate import Request, generate

from .conftest import tiny_target

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_graphs_equal_eager_and_hf():
    model = tiny_target(vocab_size=256, initializer_range=0.5).cuda()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9, 2, 13, 7, 30, 3, 11)]
    reqs = [Request(p, temperature=1.0 if i % 2 else 0.0, key=i) for i, p in enumerate(prompts)]
    outs = {graphs: [(o.tokens, o.stopped) for o in generate(model, reqs, 150, [7, 9], 0, seed=3, batch_size=4,
                                                              cache_round=16, cuda_graphs=graphs)]
            for graphs in (False, True)}
    assert outs[True] == outs[False]
    for r, (tokens, stopped) in zip(reqs, outs[True]):
        if r.temperature == 0:
            p = torch.tensor([r.prompt], device="cuda")
            ref = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=150, do_sample=False,
                                 eos_token_id=[7, 9], pad_token_id=0)[0, len(r.prompt):].tolist()
            assert (tokens, stopped) == ((ref[:-1], True) if ref[-1] in (7, 9) else (ref, False))
