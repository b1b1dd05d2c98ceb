"""Decoding attention over a KV cache whose filled length lives on the device.

In every forward the decoder runs (a decode step, a chain or tree verify, a draft step) each query row reads
all cache slots before a `prefix` and, of the T slots from there (the tokens of this round), those a small
`local` [S, T] mask marks. Given in that form, the filled length never reaches the host: one CUDA graph
serves every cache length, and the kernel reads only the slots up to prefix + T, however large the cache.

Each program serves one kv head, one fixed range of SPLIT slots and one block of at most ROW_BLOCK rows: the
query heads sharing that kv head times the S queries, stacked, so a key block is loaded once per block of rows.
Programs whose range starts past prefix + T read nothing (with the merge inside the launch, they only count
themselves in; see below). A target with few kv heads (Qwen2.5-1.5B: 2) and a verify of many queries gets
more programs, and shorter ones, from narrower ranges and several row blocks (`launch_grid`).

The ranges are combined in range order, so results repeat run after run. For a head dim up to FUSE_MAX_D
that happens inside the same launch: each program leaves its partial result and counts
itself in on a per-block counter; the last to arrive merges the block's live ranges (whichever program is
last, in the same order) and sets the counter back to zero. A small target's decode step is bound by its
number of launches, and this takes one per layer away (SmolLM2: 1.017 -> 0.972 ms a step). With 128-wide
heads one program merging every range is slower than a second kernel (the batch-invariant attention's
merge) whose programs share out the rows, so there the ranges are merged that way (docs/benchmarks.md).
The counters live in one zeroed buffer per device, made on the first call (so the first call must not be
under CUDA-graph capture: CapturedCall warms up first) and shared by every call: calls on one device must not
run on two streams at once.

`cache_attention(q, k, v, prefix, local)`: q [1, Hq, S, D], k/v [1, Hkv, L, D], prefix [1] int64 on q's
device, local [S, T] bool. Returns [1, Hq, S, D] in q's dtype. On CUDA a Triton kernel (as a custom op, so
torch.compile treats it as one opaque call); elsewhere `cache_attention_reference`, which the tests hold the
kernel to."""

from __future__ import annotations

import math

import torch

from .counters import counter_buffer
from .invariant_attention import attention_reference

try:
    import triton
    import triton.language as tl

    from .invariant_attention import _merge_kernel
except ImportError:  # CPU-only installs
    triton = None

SPLIT = 64  # cache slots per program (timed on an H200: scripts/bench_cache_attention.py, docs/benchmarks.md)
BLOCK_N = 64  # slots per step inside a program (at most SPLIT)
ROW_BLOCK = 16  # stacked rows per program; more rows are spread over several programs
MAX_ROWS = 128  # query heads per kv head times queries that the decoder hands the kernel (`serves`)
FUSE_MAX_D = 64  # head dims up to this merge the ranges inside the launch; larger ones in a second kernel


def dense_mask(prefix: torch.Tensor, local: torch.Tensor, length: int) -> torch.Tensor:
    """The [S, length] boolean mask that (prefix, local) describe, built on the device (no host read)."""
    t = local.shape[1]
    rel = torch.arange(length, device=local.device) - prefix.reshape(1)
    inside = (rel >= 0) & (rel < t)
    return (rel < 0) | (inside & local[:, rel.clamp(0, t - 1)])


def cache_attention_reference(q, k, v, prefix, local, scale=None):
    """Masked softmax attention in float32 (float64 stays float64) under `dense_mask`."""
    return attention_reference(q, k, v, dense_mask(prefix, local, k.shape[2])[None], scale)


def launch_grid(g: int, s: int, length: int, split: int | None = None, row_block: int | None = None):
    """(rows per program, row blocks, slot ranges) for g query heads per kv head, s queries and `length`
    cache slots: rows per program a power of two from 16 (tl.dot's least) up to `row_block`."""
    split, row_block = split or SPLIT, row_block or ROW_BLOCK
    rows = min(max(16, 1 << max(g * s - 1, 0).bit_length()), max(16, row_block))
    return rows, -(-g * s // rows), -(-length // split)


def serves(device: torch.device, rows: int) -> bool:
    """Whether the Triton kernel runs on `device` for `rows` stacked rows per kv head (query heads per kv head
    times queries; at most MAX_ROWS, spread over row blocks of ROW_BLOCK)."""
    return triton is not None and device.type == "cuda" and rows <= MAX_ROWS


def kernel_serves(q: torch.Tensor, k: torch.Tensor, local: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these shapes (`serves`, batch 1, a power-of-two head dim of at least
    16); otherwise `cache_attention` runs the reference."""
    b, hq, s, d = q.shape
    return (serves(q.device, hq // k.shape[1] * s) and q.dtype != torch.float64 and b == 1
            and d >= 16 and d & (d - 1) == 0 and local.shape[0] == s)


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, prefix_ptr, local_ptr, m_ptr, l_ptr, acc_ptr, count_ptr, o_ptr, scale,
                      S, T, L, G, NSPLIT, NRB, s_qh, s_qs, s_kh, s_kl, s_vh, s_vl, s_ls, s_oh, s_os,
                      IEEE: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_N: tl.constexpr, MAXSPLIT: tl.constexpr, CH: tl.constexpr,
                      FUSED: tl.constexpr):
        hk = tl.program_id(0) // NRB
        rb = tl.program_id(0) % NRB
        sp = tl.program_id(1)
        prefix = tl.load(prefix_ptr)
        r = rb * ROWS + tl.arange(0, ROWS)  # row r: query head hk*G + r // S, query r % S
        live = r < G * S
        g = r // S
        s = r % S
        dd = tl.arange(0, D)
        q = tl.load(q_ptr + (hk * G + g)[:, None] * s_qh + s[:, None] * s_qs + dd[None, :], mask=live[:, None],
                    other=0.0)
        m_i = tl.full((ROWS,), float("-inf"), tl.float32)
        l_i = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, D), tl.float32)
        lo = sp * SPLIT
        hi = tl.minimum(tl.minimum(lo + SPLIT, prefix + T), L)  # slots past the cache do not exist
        for j0 in range(lo, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            valid = j < hi
            kt = tl.load(k_ptr + hk * s_kh + j[None, :].to(tl.int64) * s_kl + dd[:, None], mask=valid[None, :],
                         other=0.0)
            if IEEE:
                scores = tl.dot(q, kt, input_precision="ieee") * scale
            else:
                scores = tl.dot(q, kt) * scale
            rel = j - prefix
            near = valid & (rel >= 0)
            marked = tl.load(local_ptr + s[:, None] * s_ls + rel[None, :], mask=live[:, None] & near[None, :],
                             other=0)
            allowed = (valid & (rel < 0))[None, :] | (marked != 0)
            scores = tl.where(allowed, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - safe)
            p = tl.exp(scores - safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(v_ptr + hk * s_vh + j[:, None].to(tl.int64) * s_vl + dd[None, :], mask=valid[:, None],
                         other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        # This range's partial result ([Hq, S, NSPLIT] for m and l, [Hq, S, NSPLIT, D] for acc), if it has one.
        row = ((hk * G + g) * S + s) * NSPLIT
        nlive = tl.cdiv(tl.minimum(prefix + T, L), SPLIT)
        if sp < nlive or not FUSED:  # the merge kernel reads every range (an empty one weighs nothing)
            tl.store(m_ptr + row + sp, m_i, mask=live)
            tl.store(l_ptr + row + sp, l_i, mask=live)
            tl.store(acc_ptr + (row + sp)[:, None] * D + dd[None, :], acc, mask=live[:, None])
        if FUSED:
            tl.debug_barrier()  # every thread's stores before the arrival below (which releases them)
            if tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel") == NSPLIT - 1:
                # The last program of this block of rows: merge the live ranges in order (loads through L2,
                # where the other programs' stores are) and set the counter back for the next call.
                tl.store(count_ptr + tl.program_id(0), 0)
                # m and l of every live range in one load each; acc in chunks of CH ranges (few trips to L2)
                ranges = tl.arange(0, MAXSPLIT)
                ok = live[:, None] & (ranges[None, :] < nlive)
                ms = tl.load(m_ptr + row[:, None] + ranges[None, :], mask=ok, other=float("-inf"),
                             cache_modifier=".cg")
                big = tl.max(ms, axis=1)
                safe = tl.where(big == float("-inf"), 0.0, big)
                ls = tl.load(l_ptr + row[:, None] + ranges[None, :], mask=ok, other=0.0, cache_modifier=".cg")
                total = tl.sum(tl.exp(ms - safe[:, None]) * ls, axis=1)
                out = tl.zeros((ROWS, D), tl.float32)
                for c in range(0, nlive, CH):
                    rc = c + tl.arange(0, CH)
                    okc = live[:, None] & (rc[None, :] < nlive)
                    at = row[:, None] + rc[None, :]
                    w = tl.exp(tl.load(m_ptr + at, mask=okc, other=float("-inf"), cache_modifier=".cg")
                               - safe[:, None])
                    part = tl.load(acc_ptr + at[:, :, None] * D + dd[None, None, :], mask=okc[:, :, None], other=0.0,
                                   cache_modifier=".cg")
                    out += tl.sum(w[:, :, None] * part, axis=1)
                out = tl.where(total[:, None] > 0, out / total[:, None], 0.0)  # a row that attends nothing: zeros
                tl.store(o_ptr + (hk * G + g)[:, None] * s_oh + s[:, None] * s_os + dd[None, :],
                         out.to(o_ptr.dtype.element_ty), mask=live[:, None])

    @torch.library.custom_op("specforge::cache_attention", mutates_args=())
    def _cache_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: torch.Tensor,
                            local: torch.Tensor, scale: float) -> torch.Tensor:
        _, hq, s, d = q.shape
        hk, length = k.shape[1], k.shape[2]
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        local = (local if local.stride(-1) == 1 else local.contiguous()).view(torch.uint8)
        g = hq // hk
        rows, nrb, nsplit = launch_grid(g, s, length)
        m = torch.empty(1, hq, s, nsplit, dtype=torch.float32, device=q.device)
        l_ = torch.empty_like(m)
        acc = torch.empty(1, hq, s, nsplit, d, dtype=torch.float32, device=q.device)
        out = torch.empty(1, hq, s, d, dtype=q.dtype, device=q.device)
        fused = d <= FUSE_MAX_D
        _split_kernel[(hk * nrb, nsplit)](
            q, k, v, prefix, local, m, l_, acc, counter_buffer(q.device, hk * nrb) if fused else m, out, scale, s,
            local.shape[1], length, g, nsplit, nrb, q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1),
            v.stride(2), local.stride(0), out.stride(1), out.stride(2),
            IEEE=q.dtype == torch.float32, D=d, ROWS=rows, SPLIT=SPLIT, BLOCK_N=min(BLOCK_N, SPLIT),
            MAXSPLIT=triton.next_power_of_2(nsplit), CH=max(1, min(8, 4096 // (rows * d))), FUSED=fused,
            num_warps=4, num_stages=2)
        if not fused:
            _merge_kernel[(hq * s,)](m, l_, acc, out, s, hq, nsplit, out.stride(0), out.stride(1), out.stride(2),
                                     D=d, BLOCK_S=triton.next_power_of_2(nsplit), num_warps=1)
        return out

    @_cache_attention_op.register_fake
    def _(q, k, v, prefix, local, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


def cache_attention(q, k, v, prefix, local, scale=None):
    """The Triton kernel where it serves (`kernel_serves`), else the reference."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if kernel_serves(q, k, local):
        return _cache_attention_op(q, k, v, prefix, local, scale)
    return cache_attention_reference(q, k, v, prefix, local, scale)
