"""Batch-invariant kernels and the deterministic switch.

On every machine: the PyTorch references (the CPU fallbacks) against float64, the key order that makes
tree verification reduce like plain decoding, and what the switch swaps and restores. On a GPU: each Triton
kernel against its reference, and the point of it all: one row's output is bitwise the same whatever the
number of rows beside it (1, 7, 64, 2048), and speculative greedy output equals plain greedy output."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from specforge.layers import RMSNorm, cache_mask, grouped_attention
from specforge.kernels import batch_invariant as bi
from specforge.kernels.invariant_attention import attention, attention_reference, key_order
from specforge.kernels.invariant_matmul import matmul, matmul_reference
from specforge.kernels.invariant_norm import rms_norm, rms_norm_reference
from specforge.kernels.invariant_softmax import softmax, softmax_reference

from .conftest import tiny_draft, tiny_target

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROWS = [1, 7, 64, 2048]


def _tree_mask(prefix: int, parents: list[int], length: int) -> torch.Tensor:
    """[T, length]: node i attends the prefix, its ancestors and itself (nodes at slots prefix + i)."""
    m = torch.zeros(len(parents), length, dtype=torch.bool)
    m[:, :prefix] = True
    for i in range(len(parents)):
        a = i
        while a >= 0:
            m[i, prefix + a] = True
            a = parents[a]
    return m


# ---- references (CPU fallbacks) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_reference_against_float64(dtype):
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(9, 70, generator=g), torch.randn(70, 33, generator=g), torch.randn(33, generator=g)
    want = a.double() @ b.double() + bias.double()
    got = matmul_reference(a.to(dtype), b.to(dtype), bias.to(dtype))
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 10)
    batched = matmul_reference(torch.stack([a, 2 * a]), torch.stack([b, b]))
    torch.testing.assert_close(batched[1].double(), 2 * (a.double() @ b.double()), rtol=1e-5, atol=1e-4)


def test_rms_norm_reference_is_hf_llama_bitwise():
    hf = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(48) + 0.5)
    x = torch.randn(5, 48).to(torch.bfloat16)
    hf = hf.to(torch.bfloat16)
    assert torch.equal(rms_norm_reference(x, hf.weight, 1e-5), hf(x))
    x64 = x.double()
    want = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5) * hf.weight.double()
    torch.testing.assert_close(rms_norm_reference(x64, hf.weight.double(), 1e-5), want)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_reference_against_float64(log):
    x = torch.randn(4, 1000, dtype=torch.float64) * 5
    want = F.log_softmax(x, -1) if log else F.softmax(x, -1)
    torch.testing.assert_close(softmax_reference(x.float(), log).double(), want, rtol=1e-5, atol=1e-6)
    # any dim, through the public entry point
    torch.testing.assert_close(softmax(x.float().t(), dim=0, log=log).double(), want.t(), rtol=1e-5, atol=1e-6)


def test_attention_reference_against_float64_gqa_and_masks():
    g = torch.Generator().manual_seed(1)
    b, hq, hk, s, length, d = 2, 4, 2, 3, 10, 16
    q = torch.randn(b, hq, s, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, length, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, length, d, generator=g, dtype=torch.float64)
    mask = torch.rand(b, s, length, generator=g) < 0.6
    mask[..., 0] = True
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(d)
    want = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), -1) @ vv
    torch.testing.assert_close(attention(q, k, v, mask), want)
    causal = torch.ones(s, length, dtype=torch.bool).tril(length - s)
    want = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ vv
    torch.testing.assert_close(attention(q, k, v, None), want)


def test_key_order_of_a_tree_is_position_order():
    """Nodes laid out depth by depth: each node's attended slots, in slot order, are its positions 0..p."""
    parents = [-1, 0, 0, 1, 1, 2, 3]  # depths 0 1 1 2 2 2 3
    depth = [0, 1, 1, 2, 2, 2, 3]
    mask = _tree_mask(5, parents, 20)
    order, count = key_order(mask[None])
    for i in range(len(parents)):
        assert count[0, i] == 5 + depth[i] + 1
        chain, a = [], i
        while a >= 0:
            chain.append(5 + a)
            a = parents[a]
        assert order[0, i, :count[0, i]].tolist() == list(range(5)) + chain[::-1]


# ---- the switch ----

def test_switch_swaps_and_restores():
    from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm

    before = LlamaRMSNorm.forward, RMSNorm.formula
    l2_before = Llama4TextL2Norm.forward
    x = torch.randn(3, 8, 16)
    mask = torch.ones(1, 4, 6, dtype=torch.bool).tril(2)
    q, k, v = torch.randn(1, 4, 4, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    plain = grouped_attention(q, k, v, cache_mask(mask, 2))
    assert not bi.active()
    with bi.batch_invariant():
        assert bi.active()
        assert LlamaRMSNorm.forward is bi._norm_forward and RMSNorm.formula is bi._norm_forward
        with bi.batch_invariant():  # nested: a no-op
            pass
        assert bi.active()
        norm = RMSNorm(16, 1e-6)
        torch.testing.assert_close(norm(x), rms_norm_reference(x, norm.weight, 1e-6), rtol=0, atol=0)
        torch.testing.assert_close(grouped_attention(q, k, v, cache_mask(mask, 2)), plain, rtol=1e-5, atol=1e-6)
        a, b = torch.randn(5, 7), torch.randn(7, 3)
        assert torch.equal(torch.mm(a, b), a @ b)  # CPU ops keep their own kernels
        assert Llama4TextL2Norm.forward is bi._l2_norm_forward
        for dtype in (torch.bfloat16, torch.float32, torch.float64):  # HF's float32 formula, bit for bit
            y = x.to(dtype)
            assert torch.equal(Llama4TextL2Norm(1e-5)(y), l2_before(Llama4TextL2Norm(1e-5), y))
    assert not bi.active()
    assert (LlamaRMSNorm.forward, RMSNorm.formula) == before
    assert Llama4TextL2Norm.forward is l2_before
    with bi.batch_invariant(enabled=False):
        assert not bi.active()


def test_decoder_with_switch_on_the_cpu_equals_plain():
    from specforge.eagle3.decoder import SpecDecoder

    target = tiny_target(seed=3, initializer_range=0.4)
    draft = tiny_draft(target)
    with bi.batch_invariant():
        for topk, nodes in ((1, None), (3, 8)):
            dec = SpecDecoder(target, draft, [2, 4, 5], max_len=120, spec_steps=4, topk=topk, num_draft_tokens=nodes)
            for p in ([5, 17, 99, 3], list(range(40, 70))):
                assert dec.generate(p, 24)[0] == dec.generate_plain(p, 24)[0]


# ---- GPU: the kernels against their references, and row invariance ----

def _rows_agree(fn, make, rows=ROWS):
    """fn(make(n))[0] is bitwise the same for every n (row 0 is the same input in every call)."""
    outs = [fn(make(n))[:1] for n in rows]
    for n, o in zip(rows[1:], outs[1:]):
        assert torch.equal(o, outs[0]), f"row 0 changed with {n} rows: max diff {(o - outs[0]).abs().max()}"


@cuda
@pytest.mark.parametrize("k, n", [(4096, 1024), (4096, 14336), (576, 49152), (1000, 77)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("training", [False, True])
def test_gpu_matmul(k, n, dtype, training):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)).to(dtype)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    got = matmul(x[:64], w.t(), bias, training=training)
    want = x[:64].double() @ w.t().double() + bias.double()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    _rows_agree(lambda a: matmul(a, w.t(), training=training), lambda m: x[:m])
    _rows_agree(lambda a: matmul(a, w.t(), bias, training=training), lambda m: x[:m])


@cuda
def test_gpu_bmm_and_strides():
    a = torch.randn(3, 50, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3, 80, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # non-contiguous
    torch.testing.assert_close(matmul(a, b).double(), a.double() @ b.double(), rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_rms_norm(dtype):
    x = torch.randn(2048, 4096, device="cuda").to(dtype)
    w = (torch.rand(4096, device="cuda") + 0.5).to(dtype)
    torch.testing.assert_close(rms_norm(x[:64], w, 1e-5), rms_norm_reference(x[:64], w, 1e-5), rtol=1e-2, atol=1e-2)
    _rows_agree(lambda t: rms_norm(t, w, 1e-5), lambda m: x[:m])
    # gradients (the draft trains through its norms) equal the reference's
    xg, wg = x[:8].float().requires_grad_(), w.float().requires_grad_()
    rms_norm(xg, wg, 1e-5).square().sum().backward()
    xr, wr = x[:8].float().requires_grad_(), w.float().requires_grad_()
    rms_norm_reference(xr, wr, 1e-5).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    torch.testing.assert_close(wg.grad, wr.grad)


@cuda
@pytest.mark.parametrize("log", [False, True])
def test_gpu_softmax(log):
    x = torch.randn(2048, 128256, device="cuda") * 4
    torch.testing.assert_close(softmax(x[:64], log=log), softmax_reference(x[:64].double(), log).float(),
                               rtol=1e-5, atol=1e-6)
    _rows_agree(lambda t: softmax(t, log=log), lambda m: x[:m])
    xb = x[:16].bfloat16()
    torch.testing.assert_close(softmax(xb, log=log, out_dtype=torch.float32),
                               softmax_reference(xb.float(), log), rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_attention(dtype):
    """Query tokens over a 2,560-slot cache (5 splits): token 0 attends the first 1,500 slots, token i the
    first 1,500 + i. Token 0's output is the same with 1, 7, 64 or 2048 tokens in the call; a tree layout
    (ancestors at other slots, same positions) gives the chain's output too."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hk, d, length, prefix = 1, 32, 8, 128, 2560, 400
    q = torch.randn(b, hq, 2048, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, hk, length, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, hk, length, d, device="cuda", generator=g).to(dtype)
    slots = torch.arange(length, device="cuda")

    def mask_of(rows):
        return (slots[None, :] <= prefix + torch.arange(rows, device="cuda")[:, None])[None]

    got = attention(q[:, :, :64], k, v, mask_of(64))
    want = attention_reference(q[:, :, :64].double(), k.double(), v.double(), mask_of(64))
    torch.testing.assert_close(got.double(), want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-2)
    outs = [attention(q[:, :, :m], k, v, mask_of(m))[:, :, :1] for m in ROWS]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    # Tree: node 3 (depth 2, parent 1) written at slot prefix+3 with its parent at prefix+1: the same keys
    # as a chain whose token at prefix+2 holds that node's key, attended in position order.
    parents = [-1, 0, 0, 1]
    tree = _tree_mask(prefix, parents, length).cuda()[None]
    kt, vt = k.clone(), v.clone()
    kt[:, :, prefix + 3], vt[:, :, prefix + 3] = k[:, :, prefix + 2], v[:, :, prefix + 2]
    qt = q[:, :, :4].clone()
    qt[:, :, 3] = q[:, :, 2]
    chain = attention(q[:, :, :3], k, v, mask_of(3) & (slots < prefix + 3))
    tree_out = attention(qt, kt, vt, tree)
    assert torch.equal(tree_out[:, :, 3], chain[:, :, 2])


@cuda
@pytest.mark.parametrize("topk, nodes", [(1, None), (4, 16)])
def test_gpu_switch_makes_speculative_equal_plain_in_bf16(topk, nodes):
    """A bf16 target with near-tied logits: the switch on, speculative greedy output is plain greedy output,
    and a forward's rows do not depend on the batch (rows of other prompts beside them)."""
    from specforge.eagle3.decoder import SpecDecoder
    from specforge.static_target import StaticTarget

    target = tiny_target(seed=3, initializer_range=0.05, num_hidden_layers=6).cuda().to(torch.bfloat16)
    draft = tiny_draft(target, std=0.05).cuda().to(torch.bfloat16)
    prompts = [list(range(40, 80)), [5, 17, 99, 3] * 10, list(range(200, 250))]
    with bi.batch_invariant():
        dec = SpecDecoder(target, draft, [2, 4, 5], max_len=300, spec_steps=5, topk=topk, num_draft_tokens=nodes,
                          cuda_graphs=True)
        for p in prompts:
            assert dec.generate(p, 64)[0] == dec.generate_plain(p, 64)[0]
        outs = []
        for batch in (1, 3):
            st = StaticTarget(target, [2, 4, 5], max_len=64, batch=batch)
            toks = torch.randint(0, 256, (batch, 20), generator=torch.Generator().manual_seed(batch)).cuda()
            toks[0] = torch.arange(20) + 7
            pos = torch.arange(20, device="cuda")[None].expand(batch, 20)
            mask = (torch.arange(64, device="cuda")[None, :] <= torch.arange(20, device="cuda")[:, None])
            outs.append(st(toks, pos, torch.arange(20, device="cuda"), mask[None].expand(batch, 20, 64))[0][:1])
        assert torch.equal(outs[0], outs[1])
