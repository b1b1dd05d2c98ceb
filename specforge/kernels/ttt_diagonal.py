"""The diagonal part of TTT attention, joined to a causal attention's output (`ttt_attention_sdpa`).

At TTT step k each query sees the causal step-0 keys and, for steps 1..k, only the key at its own position.
`ttt_attention_sdpa` runs the causal part with a flash kernel and then needs, per query row: its k diagonal
scores, the log-sum-exp over those and the causal part's, and the output rescaled and added to. That is k dot
products a row and a read of q, the k diagonal keys and values and the causal output: about 80 MB at the
Llama-8B draft's shape (T=2048, 32 heads, k=6), some 0.03 ms of memory traffic. torch.compile made it about
1.15 ms (an H100, 2026-12-06: its broadcast-and-sum reductions), which ate what the flash kernel saves over flex.

So here one Triton program owns BLOCK_T query rows of one head and walks the k diagonal keys in order (no
atomics: the same bits run after run):
- forward: the running max and sum of the k scores, then the merged output;
- backward, two kernels: dq (flash's dq plus the diagonal's) with each row's sum(dO * O), then per diagonal
  step and kv head dK and dV, summed over the head group's query heads in order.

`merge_diagonal` / `diagonal_backward` run the kernels on CUDA for 16- and 32-bit floats and the plain PyTorch
references (`merge_diagonal_reference`, `diagonal_backward_reference`, float32 or wider) elsewhere; the
tests hold the kernels to them (tests/test_kernels_gpu.py on a GPU, tests/test_kernels_interpret.py in
Triton's interpreter on the CPU)."""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK_T = 16  # query rows a program: six [BLOCK_T, 128] float32 tiles stay in registers at four warps


def merge_diagonal_reference(q, kd, vd, out0, lse0, scale):
    """q [B, Hq, T, D]; kd, vd [B, Hk, k, T, D]; out0 [B, Hq, T, D] and lse0 [B, Hq, T]: the causal part's
    output and log-sum-exp. Returns the merged output (q's dtype) and log-sum-exp (float32 or wider)."""
    b, hq, t, d = q.shape
    hk = kd.shape[1]
    g = hq // hk
    f = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(f).reshape(b, hk, 1, g, t, d) * kd.to(f).unsqueeze(3)).sum(-1) * scale  # [B, Hk, k, G, T]
    lse0 = lse0.to(f).reshape(b, hk, g, t)
    lse = torch.logaddexp(lse0, torch.logsumexp(s, dim=2))
    p = torch.exp(s - lse.unsqueeze(2))
    out = (torch.exp(lse0 - lse).unsqueeze(-1) * out0.to(f).reshape(b, hk, g, t, d)
           + (p.unsqueeze(-1) * vd.to(f).unsqueeze(3)).sum(2))
    return out.to(q.dtype).reshape(b, hq, t, d), lse.reshape(b, hq, t)


def diagonal_backward_reference(q, kd, vd, out, lse, grad_out, dq, scale):
    """Gradients through the diagonal, given the merged `out` and `lse` and the causal kernel's `dq`: dq (plus
    the diagonal's, q's dtype), dkd, dvd. The softmax is the merged one, p = exp(s - lse), and the row term
    sum(dO * O) is over the merged output."""
    b, hq, t, d = q.shape
    hk = kd.shape[1]
    g = hq // hk
    f = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(f).reshape(b, hk, 1, g, t, d)
    kf, vf = kd.to(f).unsqueeze(3), vd.to(f).unsqueeze(3)  # [B, Hk, k, 1, T, D]
    p = torch.exp((qf * kf).sum(-1) * scale - lse.to(f).reshape(b, hk, 1, g, t))  # [B, Hk, k, G, T]
    go = grad_out.to(f).reshape(b, hk, 1, g, t, d)
    row = (go * out.to(f).reshape(b, hk, 1, g, t, d)).sum(-1)
    dv = (p.unsqueeze(-1) * go).sum(3)
    ds = p * ((go * vf).sum(-1) - row) * scale
    dq = dq.to(f) + (ds.unsqueeze(-1) * kf).sum(2).reshape(b, hq, t, d)
    dk = (ds.unsqueeze(-1) * qf).sum(3)
    return dq.to(q.dtype), dk.to(kd.dtype), dv.to(vd.dtype)


def _kernel_ok(q) -> bool:
    return triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16, torch.float32)


def merge_diagonal(q, kd, vd, out0, lse0, scale):
    """`merge_diagonal_reference`'s result: the Triton kernel on CUDA, the reference elsewhere."""
    if _kernel_ok(q):
        return merge_diagonal_kernel(q, kd, vd, out0, lse0, scale)
    return merge_diagonal_reference(q, kd, vd, out0, lse0, scale)


def diagonal_backward(q, kd, vd, out, lse, grad_out, dq, scale):
    """`diagonal_backward_reference`'s result: the Triton kernels on CUDA, the reference elsewhere."""
    if _kernel_ok(q):
        return diagonal_backward_kernel(q, kd, vd, out, lse, grad_out, dq, scale)
    return diagonal_backward_reference(q, kd, vd, out, lse, grad_out, dq, scale)


def _rows_last(x):
    """x with unit stride on its last dim (the kernels take the other strides as they come)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def merge_diagonal_kernel(q, kd, vd, out0, lse0, scale):
    """The forward kernel, on whatever device Triton runs (the interpreter: the CPU)."""
    b, hq, t, d = q.shape
    hk, k = kd.shape[1], kd.shape[2]
    q, out0 = _rows_last(q), _rows_last(out0)
    kd, vd, lse0 = kd.contiguous(), vd.contiguous(), lse0.float().contiguous()
    out = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(t, BLOCK_T), b * hq)
    _merge_fwd[grid](q, kd, vd, out0, lse0, out, lse, *q.stride()[:3], *out0.stride()[:3], t, k, hq, hk, d,
                     scale, BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(d), num_warps=4)
    return out, lse


def diagonal_backward_kernel(q, kd, vd, out, lse, grad_out, dq, scale):
    """The backward kernels, on whatever device Triton runs."""
    b, hq, t, d = q.shape
    hk, k = kd.shape[1], kd.shape[2]
    q, out, grad_out, dq = _rows_last(q), _rows_last(out), _rows_last(grad_out), _rows_last(dq)
    kd, vd, lse = kd.contiguous(), vd.contiguous(), lse.float().contiguous()
    dq_out = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    row = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    dk = torch.empty_like(kd)
    dv = torch.empty_like(vd)
    block_d = triton.next_power_of_2(d)
    _diag_bwd_dq[(triton.cdiv(t, BLOCK_T), b * hq)](
        q, kd, vd, out, lse, grad_out, dq, dq_out, row, *q.stride()[:3], *out.stride()[:3],
        *grad_out.stride()[:3], *dq.stride()[:3], t, k, hq, hk, d, scale, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
        num_warps=4)
    _diag_bwd_dkv[(k, triton.cdiv(t, BLOCK_T), b * hk)](
        q, kd, vd, lse, grad_out, row, dk, dv, *q.stride()[:3], *grad_out.stride()[:3], t, k, hq, hk, d,
        scale, BLOCK_T=BLOCK_T, BLOCK_D=block_d, num_warps=4)
    return dq_out, dk, dv


if triton is not None:

    @triton.jit
    def _merge_fwd(q_ptr, kd_ptr, vd_ptr, o0_ptr, lse0_ptr, out_ptr, lse_ptr, sq_b, sq_h, sq_t, so_b, so_h, so_t,
                   T, K, HQ, HK, D, scale, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_t, bh = tl.program_id(0), tl.program_id(1)
        bi, h = bh // HQ, bh % HQ
        hk = h // (HQ // HK)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < T
        mask = rmask[:, None] & (cols[None, :] < D)
        q = tl.load(q_ptr + bi * sq_b + h * sq_h + rows[:, None] * sq_t + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        lse0 = tl.load(lse0_ptr + bh * T + rows, mask=rmask, other=0.0)
        diag = kd_ptr + (bi * HK + hk) * K * T * D + rows[:, None] * D + cols[None, :]
        vdiag = vd_ptr + (bi * HK + hk) * K * T * D + rows[:, None] * D + cols[None, :]
        m = lse0
        total = tl.full([BLOCK_T], 1.0, tl.float32)  # exp(lse0 - m)
        for j in range(K):
            kj = tl.load(diag + j * T * D, mask=mask, other=0.0).to(tl.float32)
            s = tl.sum(q * kj, axis=1) * scale
            m_new = tl.maximum(m, s)
            total = total * tl.exp(m - m_new) + tl.exp(s - m_new)
            m = m_new
        lse = m + tl.log(total)
        o0 = tl.load(o0_ptr + bi * so_b + h * so_h + rows[:, None] * so_t + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        acc = tl.exp(lse0 - lse)[:, None] * o0
        for j in range(K):
            kj = tl.load(diag + j * T * D, mask=mask, other=0.0).to(tl.float32)
            vj = tl.load(vdiag + j * T * D, mask=mask, other=0.0).to(tl.float32)
            s = tl.sum(q * kj, axis=1) * scale
            acc += tl.exp(s - lse)[:, None] * vj
        tl.store(out_ptr + bh * T * D + rows[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(lse_ptr + bh * T + rows, lse, mask=rmask)

    @triton.jit
    def _diag_bwd_dq(q_ptr, kd_ptr, vd_ptr, out_ptr, lse_ptr, go_ptr, dq_ptr, dq_out_ptr, row_ptr,
                     sq_b, sq_h, sq_t, so_b, so_h, so_t, sg_b, sg_h, sg_t, sd_b, sd_h, sd_t,
                     T, K, HQ, HK, D, scale, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_t, bh = tl.program_id(0), tl.program_id(1)
        bi, h = bh // HQ, bh % HQ
        hk = h // (HQ // HK)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < T
        mask = rmask[:, None] & (cols[None, :] < D)
        c = cols[None, :]
        q = tl.load(q_ptr + bi * sq_b + h * sq_h + rows[:, None] * sq_t + c, mask=mask, other=0.0).to(tl.float32)
        out = tl.load(out_ptr + bi * so_b + h * so_h + rows[:, None] * so_t + c, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + bi * sg_b + h * sg_h + rows[:, None] * sg_t + c, mask=mask, other=0.0).to(tl.float32)
        dq = tl.load(dq_ptr + bi * sd_b + h * sd_h + rows[:, None] * sd_t + c, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + bh * T + rows, mask=rmask, other=0.0)
        row = tl.sum(go * out, axis=1)
        diag = (bi * HK + hk) * K * T * D + rows[:, None] * D + cols[None, :]
        for j in range(K):
            kj = tl.load(kd_ptr + diag + j * T * D, mask=mask, other=0.0).to(tl.float32)
            vj = tl.load(vd_ptr + diag + j * T * D, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(tl.sum(q * kj, axis=1) * scale - lse)
            ds = p * (tl.sum(go * vj, axis=1) - row) * scale
            dq += ds[:, None] * kj
        tl.store(dq_out_ptr + bh * T * D + rows[:, None] * D + cols[None, :], dq.to(dq_out_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(row_ptr + bh * T + rows, row, mask=rmask)

    @triton.jit
    def _diag_bwd_dkv(q_ptr, kd_ptr, vd_ptr, lse_ptr, go_ptr, row_ptr, dk_ptr, dv_ptr,
                      sq_b, sq_h, sq_t, sg_b, sg_h, sg_t,
                      T, K, HQ, HK, D, scale, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # the diagonal step j varies fastest: the K programs of a row block read the same q and dO rows (cache)
        j, pid_t, bk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        bkj = bk * K + j
        bi, hk = bk // HK, bk % HK
        group = HQ // HK
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < T
        mask = rmask[:, None] & (cols[None, :] < D)
        at = bkj * T * D + rows[:, None] * D + cols[None, :]
        kj = tl.load(kd_ptr + at, mask=mask, other=0.0).to(tl.float32)
        vj = tl.load(vd_ptr + at, mask=mask, other=0.0).to(tl.float32)
        dk = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for g in range(group):
            h = hk * group + g
            q = tl.load(q_ptr + bi * sq_b + h * sq_h + rows[:, None] * sq_t + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            go = tl.load(go_ptr + bi * sg_b + h * sg_h + rows[:, None] * sg_t + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + (bi * HQ + h) * T + rows, mask=rmask, other=0.0)
            row = tl.load(row_ptr + (bi * HQ + h) * T + rows, mask=rmask, other=0.0)
            p = tl.exp(tl.sum(q * kj, axis=1) * scale - lse)
            ds = p * (tl.sum(go * vj, axis=1) - row) * scale
            dk += ds[:, None] * q
            dv += p[:, None] * go
        tl.store(dk_ptr + at, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + at, dv.to(dv_ptr.dtype.element_ty), mask=mask)
