"""The Triton kernels of `skinny_linear.add_norm_linear` and `glu_linear` run by Triton's interpreter on the
CPU (fp16: the interpreter's bf16 tl.dot is not exact), against the op-by-op reference. Runs where `triton`
imports (a CPU install of torch does not bring it: `pip install --target DIR triton` and DIR on PYTHONPATH);
skipped otherwise. The interpreter must be on before the kernel module is imported, so the check runs in a child
process. Then the kernel's sm_90 machine code, compiled on the CPU: its loads are issued ahead, not one round
trip a K step."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter)")

CHECK = r'''
import torch
from specforge.kernels import skinny_linear as sl

torch.manual_seed(0)
for m, k, n, bias, residual in [(1, 576, 960, False, True), (6, 576, 960, True, True), (16, 200, 100, True, True),
                                (3, 576, 960, False, False), (16, 576, 17000, False, True)]:
    dt = torch.float16
    x = torch.randn(m, k).to(dt)
    d = torch.randn(m, k).to(dt) if residual else None
    g = (1 + 0.1 * torch.randn(k)).to(dt)
    w = (torch.randn(n, k) * 0.05).to(dt)
    b = torch.randn(n).to(dt) if bias else None
    cfg = sl.launch(m, n, k, 132)
    for passes in (2, 1):
        y, s = sl.add_norm_linear_kernel(x, d, g, 1e-5, w, b, cfg, passes)
        normed, s_ref = sl._add_norm(x, d, g, 1e-5)
        assert (s is None) == (d is None) and (s is None or torch.equal(s, s_ref)), "the sum"
        ref = normed.float() @ w.float().T + (b.float() if b is not None else 0)
        err = (y.float() - ref).abs().max().item()
        assert err < 4e-3, (passes, m, k, n, err)  # fp16 rounding of outputs about 1
        y0, _ = sl.add_norm_linear_kernel(x[:1].contiguous(), None if d is None else d[:1].contiguous(), g, 1e-5,
                                          w, b, cfg, passes)
        assert torch.equal(y0[0], y[0]), f"row 0 alone ({passes} passes)"
print("ok")
'''


GLU_CHECK = r'''
import torch
import torch.nn.functional as F
from specforge.kernels import skinny_linear as sl

torch.manual_seed(0)
for m, k, i, bias, rows, split in [(1, 576, 1536, False, "dot", 1), (6, 576, 1536, True, "dot", 1),
                                   (16, 200, 50, True, "dot", 1), (3, 576, 1536, False, "loop", 1),
                                   (5, 200, 50, True, "loop", 1), (6, 1536, 576, False, "dot", 2)]:
    x = torch.randn(m, k).half()
    gate, up = (torch.randn(i, k) * 0.05).half(), (torch.randn(i, k) * 0.05).half()
    b = (torch.randn(i).half(), torch.randn(i).half()) if bias else None
    w = sl.interleave_rows(gate, up)
    bw = sl.interleave_rows(*b) if bias else None
    assert torch.equal(w[0::2], gate) and torch.equal(w[1::2], up)
    cfg = sl.launch(m, 2 * i, k, 132, rows=rows)[:5] + (split,)
    y = sl.skinny_linear_kernel(x, w, bw, cfg, glu=True)
    assert y.shape == (m, i)
    # HF's eager MLP on the plain projection's gate and up outputs (the same launch on the same weight): gate and
    # up rounded, silu rounded, then the product
    plain = sl.skinny_linear_kernel(x, w, bw, cfg)
    g, u = plain[:, 0::2], plain[:, 1::2]
    ref = F.silu(g.double()) * u.double()  # float64 of the rounded halves
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-3, (m, k, i, rows, split, err)  # fp16 roundings of silu and the product
    hf = (F.silu(g.float()).half().float() * u.float()).half()  # torch's own silu: its exp may differ in an ulp
    assert (y == hf).float().mean() > 0.99, (m, k, i, rows, split, "HF roundings")
    y0 = sl.skinny_linear_kernel(x[:1].contiguous(), w, bw, cfg, glu=True)
    assert torch.equal(y0[0], y[0]), (m, k, i, rows, split, "row 0 alone")
print("ok")
'''


def _interpreted(check: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, "-c", check], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def _triton_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in version("triton").split(".")[:2])


# triton 3.6's interpreter fails on both kernels ("only 0-dimensional arrays can be converted to Python
# scalars", in their K loops); 3.9's runs them. The compiled kernels are the GPU tests' (tests/test_kernels_gpu.py).
old_interpreter = pytest.mark.skipif(importlib.util.find_spec("triton") is not None and _triton_version() < (3, 9),
                                     reason="triton before 3.9: its interpreter cannot run these kernels")


DIAGONAL_CHECK = r'''
import torch
from specforge.kernels import ttt_diagonal as td

torch.manual_seed(0)
for b, hq, hk, t, d, k, dt in [(1, 4, 2, 37, 16, 1, torch.float32), (2, 6, 3, 20, 24, 3, torch.float32),
                                (1, 4, 1, 33, 16, 2, torch.bfloat16), (1, 2, 2, 16, 8, 6, torch.float16)]:
    q = torch.randn(b, t, hq, d).to(dt).transpose(1, 2)  # strided, as the draft's q
    kd, vd = torch.randn(b, hk, k, t, d).to(dt), torch.randn(b, hk, k, t, d).to(dt)
    out0 = torch.randn(b, t, hq, d).to(dt).transpose(1, 2)
    lse0 = torch.randn(b, hq, t) + 2
    out, lse = td.merge_diagonal_kernel(q, kd, vd, out0, lse0, d ** -0.5)
    ro, rl = td.merge_diagonal_reference(q.double(), kd.double(), vd.double(), out0.double(), lse0.double(), d ** -0.5)
    tol = 1e-5 if dt == torch.float32 else 2e-2
    assert out.dtype == dt and lse.dtype == torch.float32
    e1, e2 = (out.double() - ro).abs().max().item(), (lse.double() - rl).abs().max().item()
    assert e1 < tol and e2 < 1e-5, (e1, e2)
    go = torch.randn(b, t, hq, d).to(dt).transpose(1, 2)
    dq0 = torch.randn(b, hq, t, d).to(dt)
    got = td.diagonal_backward_kernel(q, kd, vd, out, lse, go, dq0, d ** -0.5)
    want = td.diagonal_backward_reference(q.double(), kd.double(), vd.double(), out.double(), lse.double(),
                                          go.double(), dq0.double(), d ** -0.5)
    errs = [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]
    assert all(g.dtype == dt for g in got) and max(errs) < (1e-5 if dt == torch.float32 else 2e-2), errs

# the whole sdpa form through autograd with the kernels in place of the reference merge (float32)
from specforge.kernels.ttt_attention import ttt_attention_reference, ttt_attention_sdpa

td._kernel_ok = lambda q: True
b, hq, hk, t, d = 2, 8, 2, 45, 16
for k in range(4):
    q = torch.randn(b, t, hq, d).transpose(1, 2).requires_grad_()
    keys = [torch.randn(b, hk, t, d, requires_grad=True) for _ in range(k + 1)]
    vals = [torch.randn(b, hk, t, d, requires_grad=True) for _ in range(k + 1)]
    got, want = ttt_attention_sdpa(q, keys, vals), ttt_attention_reference(q, keys, vals)
    g, leaves = torch.randn_like(want), [q, *keys, *vals]
    pairs = zip([got, *torch.autograd.grad(got, leaves, g)], [want, *torch.autograd.grad(want, leaves, g)])
    err = max((a - w).abs().max().item() for a, w in pairs)
    assert err < 1e-4, (k, err)
print("ok")
'''


@old_interpreter
def test_glu_projection_kernel_interpreted():
    """GLU_EPILOGUE's kernel (gate/up rows interleaved, silu(gate) * up in the epilogue), interpreted in fp16:
    HF's eager MLP applied to the plain projection's gate and up outputs (rounded, silu rounded, product
    rounded), within float64's rounding and equal in at least 99% of elements (the kernel's exp is not torch's),
    in every row mode and with a K split; each row's bits the same alone as among others."""
    _interpreted(GLU_CHECK)


@old_interpreter
def test_add_norm_linear_kernel_interpreted():
    _interpreted(CHECK)


def test_fused_kernel_loads_are_prefetched_in_sm90_code():
    """Compiled for sm_90 on the CPU (scripts/kernel_sass.py), the fused kernel, in two passes or one, issues
    its loads ahead (cp.async) as the projection's K loop does: no K step waits a round trip on plain loads
    (the first pass had 5 at K=576, and the fused launch took two projections' time on an H100). The norm
    weight's one load is the only plain load allowed."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "kernel_sass.py"
    spec = importlib.util.spec_from_file_location("kernel_sass", script)
    ks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ks)
    (_, skinny), *fused_forms, _ = ks.decode_kernels(960, 576)
    skinny = ks.sass_profile(skinny)
    assert skinny["plain"] == 0 and skinny["async"] > 0 and skinny["mma"] > 0
    assert len(fused_forms) == 2  # two passes and one
    for _, kernel in fused_forms:
        fused = ks.sass_profile(kernel)
        assert fused["plain"] <= 1 and fused["async"] >= skinny["async"] and fused["mma"] == skinny["mma"], fused


def test_glu_kernel_differs_from_the_projection_only_in_its_epilogue_in_sm90_code():
    """GLU_EPILOGUE's kernel at the embedded default's gate/up projection (3072 x 576), compiled for sm_90 on the
    CPU: the projection's loads (all prefetched), MMAs and shared memory, and a few instructions more
    for the epilogue (a handful of exp and reciprocal: FUSE_GATE's K-loop form had 256 and 5x the instructions)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "kernel_sass.py"
    spec = importlib.util.spec_from_file_location("kernel_sass", script)
    ks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ks)
    (_, skinny), *_, (name, glu) = ks.decode_kernels(3072, 576)
    assert "GLU" in name
    skinny, glu = ks.sass_profile(skinny), ks.sass_profile(glu)
    for key in ("plain", "async", "mma", "smem"):
        assert glu[key] == skinny[key], (key, skinny, glu)
    assert glu["regs"] <= skinny["regs"] + 16, (skinny, glu)
    assert skinny["mufu"] == 0 and 0 < glu["mufu"] <= 8
    assert skinny["instructions"] < glu["instructions"] <= 1.25 * skinny["instructions"], (skinny, glu)


@old_interpreter  # triton 3.6's interpreter fails here as on the kernels above (its sm_90 compile works)
def test_ttt_diagonal_kernels_interpreted():
    """The TTT attention's diagonal merge (specforge/kernels/ttt_diagonal.py), forward and both backward
    kernels, against the float64 reference: grouped-query heads, row counts not a multiple of BLOCK_T, a head
    size not a power of two, q, the causal output and dO as strided views of [B, T, H, D], float32 within its
    rounding, 16-bit within theirs."""
    _interpreted(DIAGONAL_CHECK)


def test_ttt_diagonal_kernels_compile_for_sm90():
    """The diagonal merge's three kernels compiled for sm_90 on the CPU (scripts/kernel_sass.py's
    `compile_sm90`) at the Llama-8B draft's shape, as a launch binds them: they build with the triton at hand
    (the GPU machine's is 3.6, whose interpreter cannot run them), from registers alone (no shared memory), at
    most 128 a thread at four warps."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "kernel_sass.py"
    spec = importlib.util.spec_from_file_location("kernel_sass", script)
    ks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ks)
    from specforge.kernels import ttt_diagonal as td

    for fn in (td._merge_fwd, td._diag_bwd_dq, td._diag_bwd_dkv):
        sig = {}
        for name in fn.arg_names:
            if name in ("BLOCK_T", "BLOCK_D"):
                continue
            if name.endswith("_ptr"):
                sig[name] = "*fp32" if name.startswith(("lse", "row")) else "*bf16"
            else:
                sig[name] = "fp32" if name == "scale" else "i32"
        kernel = ks.compile_sm90(fn, sig, {"BLOCK_T": td.BLOCK_T, "BLOCK_D": 128}, {"T": 2048, "D": 128}, 4, 3)
        profile = ks.sass_profile(kernel)
        assert profile["smem"] == 0 and 0 < profile["regs"] <= 128, (fn, profile)


LABELS_CHECK = r'''
import torch
from specforge.kernels import target_labels as tl_

torch.manual_seed(0)
for c, v, vd, dt in [(5, 300, 40, torch.float32), (3, 9000, 700, torch.bfloat16), (4, 4096, 4096, torch.float16)]:
    full = (torch.randn(c, v) * 4).to(dt)
    full[1, 17] = full[1, v - 3] = full[1].max() + 1  # a tie for the largest value: the first index wins
    ids = torch.randperm(v)[:vd].sort().values
    got = (torch.empty(c, vd), torch.empty(c), torch.empty(c, dtype=torch.long))
    tl_.label_rows_triton(full, ids, *got)
    want = (torch.empty(c, vd), torch.empty(c), torch.empty(c, dtype=torch.long))
    tl_.label_rows_reference(full, ids, *want)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), (c, v, "logits or argmax")
    assert got[2][1].item() == 17
    gold = torch.logsumexp(full.double(), -1)
    assert (got[1].double() - gold).abs().max().item() < 1e-5, (c, v, "lse")
print("ok")
'''


@old_interpreter
def test_target_labels_kernel_interpreted():
    """The soft labels' row kernel (specforge/kernels/target_labels.py) against the op-by-op reference: the
    draft-vocab logits and the argmax (a tie: the first index) bit for bit, the lse against float64, in float32,
    bf16 and fp16, vocab sizes below, across and at a multiple of the kernel's block."""
    _interpreted(LABELS_CHECK)
