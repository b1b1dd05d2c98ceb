"""Linear layers over a few rows (a decode step, a verify): y = x W^T + b for x of at most MAX_ROWS rows.

At one to sixteen rows a linear layer is a read of its weight, and cuBLAS splits narrow weights into too few
column tiles to keep the memory busy: on an H200 Qwen2.5-1.5B's o_proj (1536 x 1536) ran as 24 tiles at
0.75 TB/s, its q/k/v projection at 1.2 TB/s, against about 4 TB/s that a copy reaches. Here each program
owns BLOCK_N output columns for all rows and walks K in order (no split, no atomics: the same result run after
run), so a narrow weight still spreads over every SM.

A row's result must not depend on how many rows come with it: greedy speculative decoding gives exactly the
plain decoder's tokens only if a token's logits in a verify of S+1 rows equal, bit for bit, its logits in a
one-row decode step. So the launch shape never depends on the row count, and each row is reduced the same way
whatever the count (ROWS; timed on an H200 for SmolLM2-135M, scripts/bench_decode.py, docs/benchmarks.md):
- "dot" (default): tl.dot with the rows padded to 16 (a tensor core computes each output row from its own
  input row); column blocks of at least 16. Decode step 1.018 ms, verify of 6 / 16 rows 1.073 / 1.097 ms.
- "loop": multiply-adds, the weight block loaded once and each row reduced against it in turn, so column
  blocks can be as narrow as 4. A verify pays one CUDA-core reduction per row: 1.002 / 1.630 / 2.886 ms.
- "mixed": one row by "loop", several by "dot": 0.986 / 1.075 / 1.101 ms, but a verify's rows then round
  differently from decode steps and greedy speculative decoding drifts from plain decoding (99 of 160 bench
  turns differed). Kept to measure what exactness costs.

Split K (`SPLIT_PROGRAMS`, off by default until timed): a narrow weight gives few column blocks (SmolLM2's o_proj
and down projection: 18 programs on a 132-SM chip), so each program reads a long row of K alone. With a split,
each column block's K is cut into slices, one program each; every program leaves its float32 partial sums
and counts itself in on the block's arrival counter (`counters`), and the last to arrive adds the slices in
slice order, so the result repeats run after run and, as the split depends only on the weight's shape, a
row's bits do not depend on how many rows come with it. A split also lets the kernel take a K over MAX_K
(MAX_K_SPLIT), which an MLP's down projection has (Qwen2.5-1.5B: 8,960).

`linear(x, weight, bias)`: x [..., K], weight [N, K], bias [N] or None. The kernel runs on CUDA for bf16/fp16
inputs of at most MAX_ROWS rows and K <= MAX_K with a contiguous weight, outside the deterministic switch
(whose invariant matmul must see every matmul); everything else is `F.linear`, the reference the tests hold
the kernel to.
The kernel is a custom op, so torch.compile treats it as one opaque call and CUDA graphs capture it.

`add_norm_linear(x, delta, norm_weight, eps, weight, bias)`: RMSNorm(x + delta) W^T + b and the sum x + delta,
in one launch. A decoder layer adds a residual, norms it and projects it twice (q/k/v, gate/up), and the
target adds and norms once more before its head; compiled, each add-and-norm is a kernel of its own (about
2.5 us at a step bound by its launches: two per layer). Here every program adds the rows itself, takes their
mean square over all of K, and normalises and scales each K step before its tl.dot, rounding where HF's
RMSNorm rounds (the sum to the input dtype, the normalised rows to it, the product with the norm's weight to
it); the first column block writes the sum out as the residual. A row's result still does not depend on the
row count. `add_norm_linear_reference` is the same in plain PyTorch (the CPU fallback). With NORM_PASSES = 1
(bf16) one K loop instead projects the unnormalised rows times the norm's weight and scales each row by its
1/rms at the end: the same within bf16 rounding, without a pass over K before the weights stream.

`glu_linear(x, weight, bias)`: silu(gate) * up of a gated MLP, in its gate/up projection's launch
(GLU_EPILOGUE): the weight's rows interleave gate and up (`interleave_rows`: gate 0, up 0, gate 1, ...), so each
program's tile holds both halves of its columns and forms silu(gate) * up once per output element, after the K
loop. Forming it in the down projection's K loop instead (FUSE_GATE, gone) recomputed it for the 16 rows of a
tensor-core tile in each of the 18 programs, inside the loop: 45% slower steps on an H100 (docs/benchmarks.md,
2026-12-05); `glu-down`, which took a pass over the row first, 57%. The roundings are HF's eager MLP's (gate and
up rounded to the output dtype, silu rounded, then the product), so the compiled and eager forwards agree."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import batch_invariant
from .counters import counter_buffer
from .invariant_matmul import _sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

MAX_ROWS = 16  # tl.dot's least row tile; more rows are a matmul, which cuBLAS does well
MAX_K = 4096  # a longer K (an MLP's down projection) wants its sum split over programs, as cuBLAS does
ROW_MODES = ("loop", "dot", "mixed")  # how rows can be reduced (module docstring)
ROWS = "dot"  # the one `launch` uses (scripts/bench_decode.py --skinny-rows times the others)
SPLIT_PROGRAMS = 0  # split K until a launch has about this many programs (0: never; see `split_k`)
MAX_K_SPLIT = 16384  # the longest K the kernel takes when splits are on
# add_norm_linear's kernel; off (the add and the norm op by op): timed on an H100 (2026-12-05) it made the target
# step 12-18% slower, its first pass then waiting a memory round trip per K step (`pass1_stages`, since
# pipelined, is not yet timed; bench_decode.py --fuse-norm 1 times it, scripts/kernel_sass.py shows the loads)
FUSE_NORM = False
# How the kernel norms: 2, HF's roundings (a first pass over K for the sums of squares, then the normed rows
# projected); 1 (bf16 only), one K loop that projects the rows times the norm's weight and scales each row's sums
# by its 1/rms at the end: no pass before the weights stream, at the price of HF's exact roundings (about 0.0035
# rms from HF's result at outputs about 1, against the two-pass form's 0.002: docs/benchmarks.md, 2026-12-05,
# twenty-first session; bench_decode.py --norm-passes times it). In fp16 the unnormalised product could
# overflow, so fp16 always takes 2.
NORM_PASSES = 2
# glu_linear's kernel (the static target interleaves its gate/up weights for it): a gated MLP's silu(gate) * up in
# the gate/up projection's epilogue, one kernel fewer per layer: the SmolLM2 target step 0.990 ms against 1.038
# op by op (H100, 2026-12-05, compare_decode.py --repeat 2; docs/benchmarks.md). bench_decode.py --glu 0 times
# it off.
GLU_EPILOGUE = True


def split_k(n: int, k: int, block_n: int, block_k: int, programs: int | None = None) -> int:
    """K slices per column block: the largest power of two that keeps the launch at most `programs` programs
    (SPLIT_PROGRAMS by default; 0: 1) and every slice at least one K step long."""
    programs = SPLIT_PROGRAMS if programs is None else programs
    blocks, split = -(-n // block_n), 1
    while blocks * split * 2 <= programs and k >= split * 2 * block_k:
        split *= 2
    return split


def max_k() -> int:
    return MAX_K_SPLIT if SPLIT_PROGRAMS else MAX_K


def launch(m: int, n: int, k: int, sms: int = 132, rows: str | None = None) -> tuple[int, int, int, int, bool, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, DOT, SPLIT) for m rows of an [n, k] weight. Multiply-adds: column
    blocks as narrow as 4, until there are about 8 programs per SM (more weight rows in flight), and K steps of
    up to 512; tl.dot: 32 columns (64 where that still gives 2 programs per SM), K steps of 128 or 256. Chosen
    from a sweep on an H200 (scripts/bench_linear.py, docs/benchmarks.md). Only "mixed" looks at m."""
    rows = rows or ROWS
    if rows not in ROW_MODES:
        raise ValueError(f"skinny_linear.ROWS: {rows!r} is not one of {ROW_MODES}")
    dot = rows == "dot" or (rows == "mixed" and m > 1)
    if not dot:
        block_n = 64
        while block_n > 4 and -(-n // block_n) < 8 * sms:
            block_n //= 2
        block_k = min(512, 4096 // block_n)
    else:
        block_n = 64 if -(-n // 64) >= 2 * sms else 32
        # K steps of 128 for short K (SmolLM2's 576: 3.25-3.79 us against 3.51-4.14 with 256), 256 for long
        # ones; wide column blocks keep 128 up to a longer K (Qwen2.5-1.5B's gate_up, K=1536: 17.2 against
        # 19.1 us) but not at 4096 (Llama-3.1-8B's gate_up: 59.5 against 66.2 us). H200 sweep, 2026-12-04.
        block_k = 256 if k > (2048 if block_n == 64 else 1024) else 128
    block_k = min(block_k, max(64, 1 << (k - 1).bit_length()))
    return block_n, block_k, 4, 4, dot, split_k(n, k, block_n, block_k)


def serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes the kernel for these inputs (see the module docstring)."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.dim() == 2 and weight.is_contiguous()
            and x.shape[-1] == weight.shape[1] and x.shape[-1] <= max_k() and x.numel() <= MAX_ROWS * x.shape[-1]
            and not batch_invariant.active())


if triton is not None:

    @triton.jit
    def _silu_mul(g, u):
        # silu(g) * u with HF's eager roundings: silu in float32 as torch's CUDA kernel computes it (x / (1 +
        # exp(-x))), rounded to the input dtype, then the product rounded.
        gf = g.to(tl.float32)
        a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        return (a.to(tl.float32) * u.to(tl.float32)).to(g.dtype)

    @triton.jit(do_not_specialize=["M"])  # one binary for every row count: M == 1 must not compile apart
    def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, KS, s_xm, s_wn, s_ym,
                       HAS_BIAS: tl.constexpr, DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GLU: tl.constexpr = False):
        # Program (column block, K slice): columns rn, K from k_lo to k_hi (all of K without a split). GLU: the
        # columns interleave gate and up (2j gate j, 2j + 1 up j), and y gets silu(gate) * up, N / 2 wide.
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rn_safe = tl.where(n_ok, rn, 0)  # columns past N read row 0 (in bounds) and are never stored
        rm = tl.arange(0, 16)
        k_lo = tl.program_id(1) * KS
        k_hi = tl.minimum(k_lo + KS, K)
        acc = tl.zeros((16, BLOCK_N), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w_ptrs = w_ptr + rn_safe[:, None].to(tl.int64) * s_wn + rk[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=rk[None, :] < k_hi, other=0.0)
            if DOT:
                x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :],
                            mask=(rm[:, None] < M) & (rk[None, :] < k_hi), other=0.0)
                acc = tl.dot(x, tl.trans(w), acc)
            else:
                wf = w.to(tl.float32)
                for m in range(0, M):  # each row against the loaded block, the same sums whatever M is
                    if EVEN_K:
                        x = tl.load(x_ptr + m * s_xm + rk)
                    else:
                        x = tl.load(x_ptr + m * s_xm + rk, mask=rk < k_hi, other=0.0)
                    part = tl.sum(wf * x.to(tl.float32)[None, :], axis=1)
                    acc = tl.where(rm[:, None] == m, acc + part[None, :], acc)
        last = True
        if SPLIT > 1:
            # Leave this slice's sums, count in; the last slice of the block to arrive adds all of them in slice
            # order (loads through L2, where the others' stores are) and sets the counter back.
            tile = rm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            block = part_ptr + tl.program_id(0) * (SPLIT * 16 * BLOCK_N)
            tl.store(block + tl.program_id(1) * (16 * BLOCK_N) + tile, acc)
            tl.debug_barrier()  # every thread's stores before the arrival below (which releases them)
            last = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel") == SPLIT - 1
            if last:
                tl.store(count_ptr + tl.program_id(0), 0)
                acc = tl.load(block + tile, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT):
                    acc += tl.load(block + s * (16 * BLOCK_N) + tile, cache_modifier=".cg")
        if last:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GLU:  # gate and up rounded as their projection's outputs, then silu(gate) * up (`_silu_mul`)
                gate, up = tl.split(tl.reshape(acc.to(y_ptr.dtype.element_ty), (16, BLOCK_N // 2, 2)))
                rj = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
                tl.store(y_ptr + rm[:, None] * s_ym + rj[None, :], _silu_mul(gate, up),
                         mask=(rm[:, None] < M) & (rj[None, :] < N // 2))
            else:
                tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                         mask=(rm[:, None] < M) & n_ok[None, :])

    def skinny_linear_kernel(x2: torch.Tensor, weight: torch.Tensor, bias, cfg=None, glu: bool = False) -> torch.Tensor:
        """The kernel on x2 [M, K] (M <= MAX_ROWS, last dim contiguous); `cfg` overrides `launch` (timing):
        (BLOCK_N, BLOCK_K, num_warps, num_stages, DOT[, SPLIT]). `glu`: the weight's rows interleave gate and up
        (`interleave_rows`), and y [M, N / 2] is silu(gate) * up."""
        m, k = x2.shape
        n = weight.shape[0]
        if glu and n % 2:
            raise ValueError(f"skinny_linear: a GLU weight of {n} rows (gate and up interleaved: an even count)")
        y = torch.empty(m, n // 2 if glu else n, dtype=x2.dtype, device=x2.device)
        if m == 0:
            return y
        block_n, block_k, warps, stages, dot, *rest = cfg or launch(m, n, k, _sm_count(x2.device.index or 0))
        split = rest[0] if rest else 1
        blocks = triton.cdiv(n, block_n)
        ks = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # each slice a whole number of K steps
        split = triton.cdiv(k, ks)  # no empty slices
        if split > 1:
            part = torch.empty(blocks * split * 16 * block_n, dtype=torch.float32, device=x2.device)
            count = counter_buffer(x2.device, blocks)
        else:
            part = count = y  # not read
        _skinny_kernel[(blocks, split)](
            x2, weight, bias if bias is not None else weight, y, part, count, m, n, k, ks, x2.stride(0),
            weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, DOT=dot, EVEN_K=k % block_k == 0, SPLIT=split,
            BLOCK_N=block_n, BLOCK_K=block_k, GLU=glu, num_warps=warps, num_stages=stages)
        return y

    def _rows(t: torch.Tensor) -> torch.Tensor:
        """t as contiguous rows [M, K] (a view where it can be)."""
        t2 = t.reshape(-1, t.shape[-1])
        return t2 if t2.stride(-1) == 1 else t2.contiguous()

    @torch.library.custom_op("specforge::skinny_linear", mutates_args=())
    def _skinny_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return skinny_linear_kernel(_rows(x), weight, bias).view(*x.shape[:-1], weight.shape[0])

    @_skinny_linear_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.custom_op("specforge::glu_linear", mutates_args=())
    def _glu_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return skinny_linear_kernel(_rows(x), weight, bias, glu=True).view(*x.shape[:-1], weight.shape[0] // 2)

    @_glu_linear_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)

    @triton.jit(do_not_specialize=["M"])
    def _add_norm_kernel(x_ptr, d_ptr, g_ptr, w_ptr, b_ptr, y_ptr, s_ptr, M, N, K, eps, s_xm, s_dm, s_wn, s_ym,
                         s_sm, HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES1: tl.constexpr,
                         ONE_PASS: tl.constexpr):
        # Program: columns rn for all rows, all of K. Two passes (HF's roundings): pass 1 adds the rows (the first
        # column block stores the sum) and takes their sums of squares; pass 2 normalises, scales and projects
        # each K step. ONE_PASS: one loop adds, squares and projects the unnormalised rows times the norm's
        # weight; each row's sums are scaled by its 1/rms at the end.
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rn_safe = tl.where(n_ok, rn, 0)
        rm = tl.arange(0, 16)
        m_ok = rm < M
        dtype = y_ptr.dtype.element_ty
        squares = tl.zeros((16,), tl.float32)
        acc = tl.zeros((16, BLOCK_N), tl.float32)
        if not ONE_PASS:
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES1):  # loads prefetched: not a round trip a step
                rk = k0 + tl.arange(0, BLOCK_K)
                ok = m_ok[:, None] & (rk[None, :] < K)
                s = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=ok, other=0.0)
                if HAS_DELTA:
                    s = (s.to(tl.float32) + tl.load(d_ptr + rm[:, None] * s_dm + rk[None, :], mask=ok,
                                                    other=0.0).to(tl.float32)).to(dtype)
                    if pid == 0:
                        tl.store(s_ptr + rm[:, None] * s_sm + rk[None, :], s, mask=ok)
                sf = s.to(tl.float32)
                squares += tl.sum(sf * sf, axis=1)
        rstd = tl.math.rsqrt(squares / K + eps)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            ok = m_ok[:, None] & k_ok[None, :]
            s = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=ok, other=0.0)
            if HAS_DELTA:
                s = (s.to(tl.float32) + tl.load(d_ptr + rm[:, None] * s_dm + rk[None, :], mask=ok,
                                                other=0.0).to(tl.float32)).to(dtype)
                if ONE_PASS and pid == 0:
                    tl.store(s_ptr + rm[:, None] * s_sm + rk[None, :], s, mask=ok)
            g = tl.load(g_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
            if ONE_PASS:
                sf = s.to(tl.float32)
                squares += tl.sum(sf * sf, axis=1)
                xw = (sf * g[None, :]).to(dtype)
            else:
                xn = (s.to(tl.float32) * rstd[:, None]).to(dtype)
                xw = (xn.to(tl.float32) * g[None, :]).to(dtype)
            w_ptrs = w_ptr + rn_safe[:, None].to(tl.int64) * s_wn + rk[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            acc = tl.dot(xw, tl.trans(w), acc)
        if ONE_PASS:
            acc = acc * tl.math.rsqrt(squares / K + eps)[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :], acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])

    def pass1_stages(k: int, block_k: int) -> int:
        """Software-pipeline stages of the kernel's first pass (the sums of squares): up to 4 K steps' loads in
        flight. Unpipelined, it waited one memory round trip per K step before the projection's weights were
        asked for, and the fused kernel took twice the projection's time (H100, 2026-12-05)."""
        return min(triton.cdiv(k, block_k), 4) + 1

    def add_norm_linear_kernel(x2, d2, norm_weight, eps: float, weight, bias, cfg=None, passes=None):
        """The kernel on x2 (and d2, or None) [M, K] (M <= MAX_ROWS, last dim contiguous); returns (y, sum or
        None). `cfg` overrides `launch`'s (BLOCK_N, BLOCK_K, num_warps, num_stages); `passes` NORM_PASSES (1
        serves bf16 only, unless given here: the tests' fp16 is small enough)."""
        one_pass = passes == 1 if passes is not None else (NORM_PASSES == 1 and x2.dtype == torch.bfloat16)
        m, k = x2.shape
        n = weight.shape[0]
        y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        s = torch.empty_like(x2) if d2 is not None else None
        if m == 0:
            return y, s
        block_n, block_k, warps, stages = (cfg or launch(m, n, k, _sm_count(x2.device.index or 0)))[:4]
        _add_norm_kernel[(triton.cdiv(n, block_n),)](
            x2, d2 if d2 is not None else x2, norm_weight, weight, bias if bias is not None else weight, y,
            s if s is not None else y, m, n, k, eps, x2.stride(0), d2.stride(0) if d2 is not None else 0,
            weight.stride(0), y.stride(0), s.stride(0) if s is not None else 0, HAS_DELTA=d2 is not None,
            HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k,
            STAGES1=pass1_stages(k, block_k), ONE_PASS=one_pass, num_warps=warps, num_stages=stages)
        return y, s

    @torch.library.custom_op("specforge::add_norm_linear", mutates_args=())
    def _add_norm_linear_op(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        y, s = add_norm_linear_kernel(_rows(x), _rows(delta), norm_weight, eps, weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0]), s.view(x.shape)

    @_add_norm_linear_op.register_fake
    def _(x, delta, norm_weight, eps, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(x.shape)

    @torch.library.custom_op("specforge::norm_linear", mutates_args=())
    def _norm_linear_op(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
        y, _ = add_norm_linear_kernel(_rows(x), None, norm_weight, eps, weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])

    @_norm_linear_op.register_fake
    def _(x, norm_weight, eps, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])


def norm_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `add_norm_linear` takes the kernel: FUSE_NORM, as `serves`, with tl.dot rows and no K split (the
    sum of squares needs all of K in each program)."""
    return (FUSE_NORM and serves(x, weight) and ROWS == "dot" and x.shape[-1] <= MAX_K
            and (not SPLIT_PROGRAMS or launch(1, weight.shape[0], x.shape[-1], _sm_count(x.device.index or 0))[5] == 1))


def add_norm_linear_reference(x: torch.Tensor, delta: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                              weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """(RMSNorm(x + delta) W^T + b, x + delta) op by op, with HF's RMSNorm (statistics in float32 at least,
    the normalised rows rounded to the input dtype, then times the norm's weight)."""
    normed, s = _add_norm(x, delta, norm_weight, eps)
    return F.linear(normed, weight, bias), s


def _add_norm(x, delta, norm_weight, eps):
    s = x if delta is None else x + delta
    y = s.to(torch.promote_types(s.dtype, torch.float32))
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return norm_weight * y, s


def add_norm_linear(x: torch.Tensor, delta: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """(RMSNorm(x + delta) W^T + b, x + delta) (delta None: x alone): one launch where it serves (`norm_serves`,
    and a norm weight of x's dtype), else op by op as `add_norm_linear_reference` (the projection by `linear`)."""
    if (norm_serves(x, weight) and norm_weight.dtype == x.dtype and norm_weight.is_contiguous()
            and (delta is None or (delta.shape == x.shape and delta.dtype == x.dtype))):
        if delta is None:
            return _norm_linear_op(x, norm_weight, eps, weight, bias), x
        return _add_norm_linear_op(x, delta, norm_weight, eps, weight, bias)
    normed, s = _add_norm(x, delta, norm_weight, eps)
    return linear(normed, weight, bias), s


def interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[2I, ...]: the rows (or bias entries) of a gated MLP's gate and up projections interleaved, gate 0, up 0,
    gate 1, up 1, ...: the layout `glu_linear` reads, which puts both halves of an output in one program."""
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def glu_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `glu_linear` takes the kernel: GLU_EPILOGUE, an even row count, and the rows `serves` takes."""
    return GLU_EPILOGUE and weight.shape[0] % 2 == 0 and serves(x, weight)


def _silu_mul_halves(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from an interleaved gate/up output, the halves made contiguous first (one copy): on a
    strided view torch's CPU silu takes a scalar exp, whose float32 bits differ from the vectorised one HF's
    module gets."""
    gate, up = y.unflatten(-1, (-1, 2)).movedim(-1, 0).contiguous()
    return F.silu(gate) * up


def glu_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """silu(gate) * up for interleaved gate/up rows (`interleave_rows`), op by op as HF's eager MLP computes it."""
    return _silu_mul_halves(F.linear(x, weight, bias))


def glu_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(gate) * up for interleaved gate/up rows: one launch where it serves (`glu_serves`), else the
    projection by `linear` and the rest op by op."""
    if glu_serves(x, weight):
        return _glu_linear_op(x, weight, bias)
    return _silu_mul_halves(linear(x, weight, bias))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b: the skinny kernel where it serves (`serves`), else F.linear."""
    if serves(x, weight):
        return _skinny_linear_op(x, weight, bias)
    return F.linear(x, weight, bias)
