"""Online training speed on one GPU, with a random-weight target of a real shape (speed only).

Runs the training step of `specforge train --mode online` phase by phase (the same functions the loop
calls) and prints tokens/s, model FLOPs utilisation, peak memory and where the time goes. Any `train.*`
override selects a variant, so one call can compare kernels side by side on the same card:

  python scripts/bench_train.py --shape llama3.1-8b --seq 2048 --batch 1
  python scripts/bench_train.py --shape llama3.1-8b --variant ref train.attention=reference train.fused_loss=false \\
                                --variant fused train.attention=auto train.fused_loss=true
  python scripts/bench_train.py --shape smollm2-135m --seq 512 --batch 16 --sync-debug   # the GPU recipe's step
  python scripts/bench_train.py --shape llama3.1-8b --profile     # and the step's kernels by kind and by phase
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import time
import warnings

import torch

from specforge.config import load_config
from specforge.data.batching import collate
from specforge.data.template import Sample
from specforge.data.vocab import build_vocab, count_tokens
from specforge.eagle3.train import (OnlineFeatures, apply_update, build_draft, clip_gradients, clips_in_adamw,
                                   compiles_target, defers_reads, run_batch, set_deterministic)
from specforge.files import write_text
from specforge.kernels.batch_invariant import batch_invariant
from specforge.model_shapes import random_target
from specforge.targets import TargetHead, aux_layer_ids, text_config

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), 989e12)


def train_flops(tcfg, dcfg, tokens: int, seq: int, ttt: int, draft_vocab: int) -> float:
    """Model FLOPs of one step: target forward (+ its lm_head for the soft labels) and, per TTT step,
    the draft layer and draft lm_head forward and backward (backward = 2x forward). Causal attention
    counts half the T x T scores; the TTT diagonal terms are negligible."""
    def layer(h, inter, heads, kv, d, width_in):
        proj = 2 * width_in * (heads + 2 * kv) * d + 2 * heads * d * h
        return proj + 2 * 3 * h * inter + 2 * 2 * heads * d * seq / 2

    h, d = tcfg.hidden_size, getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    inter = tcfg.intermediate_size
    if getattr(tcfg, "num_local_experts", 0):  # MoE (Llama 4): the routed experts a token uses + the shared one
        inter *= tcfg.num_experts_per_tok + 1
    target = tcfg.num_hidden_layers * layer(h, inter, tcfg.num_attention_heads,
                                            tcfg.num_key_value_heads, d, h) + 2 * h * tcfg.vocab_size
    draft_step = layer(h, dcfg.intermediate_size, dcfg.num_attention_heads, dcfg.num_key_value_heads,
                       dcfg.head_dim, 2 * h) + 2 * h * draft_vocab
    draft = 2 * 3 * h * h + ttt * draft_step
    return tokens * (target + 3 * draft)


def run_variant(name, shape, target, samples, overrides, args):
    depth = [f"target.aux_layer_ids=[1,{args.layers // 2},{args.layers - 1}]"] if args.layers else []
    cfg = load_config(shape, overrides=["device=cuda", f"train.batch_size={args.batch}",
                                        f"data.max_length={args.seq}", *depth, *overrides])
    with batch_invariant(cfg.train.deterministic, training=True):  # what `specforge train` does with the switch
        return _run_variant(cfg, name, shape, target, samples, args)


def _run_variant(cfg, name, shape, target, samples, args):
    ids = aux_layer_ids(cfg.target, target)
    features = OnlineFeatures(target, ids, compiles_target(cfg, torch.device("cuda")))
    try:  # the target's layers compiled for this variant (train.compile_target) go back to eager after it
        return _timed_variant(cfg, name, shape, target, samples, args, ids, features)
    finally:
        features.close()


def _timed_variant(cfg, name, shape, target, samples, args, ids, features):
    dev = torch.device("cuda")
    set_deterministic(cfg.train.deterministic)
    head = TargetHead.from_model(target)
    vocab = head.embed.weight.shape[0]
    d2t, t2d = build_vocab(count_tokens(samples, vocab), min(cfg.target.draft.draft_vocab_size, vocab))
    draft = build_draft(cfg, head, ids, d2t, t2d)
    draft_ids = draft.target_ids().to(dev)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    defer = defers_reads(cfg, dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    tokens, t0, losses, timed = 0, 0.0, [], []
    prev = None
    for i in range(args.steps + args.warmup):
        if i == args.warmup:
            torch.cuda.synchronize()
            t0, tokens, timed = time.perf_counter(), 0, []
        rows = samples[(i * args.batch) % len(samples):][:args.batch]
        batch = collate(rows)  # on the host: run_batch moves it (and the index of its scored positions)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(PHASES) + 1)]
        marks = iter(ev)  # one event at each phase's start and one at the end
        loss = train_step(cfg, draft, features, head, draft_ids, batch, params, opt, dev,
                          mark=lambda: next(marks).record())
        # The host's read of a step, as the loop makes it (train.defer_reads): the step before, once this one is
        # queued; else this one, at its end.
        (prev if defer and prev is not None else ev)[-1].synchronize()
        prev = ev
        timed.append(ev)
        tokens += batch.num_tokens
        losses.append(loss.detach())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    spent = {p: sum(e[k].elapsed_time(e[k + 1]) for e in timed) / 1e3 for k, p in enumerate(PHASES)}
    tps = tokens / elapsed
    if args.sync_debug:
        print(f"{shape} {name}: {host_syncs(cfg, draft, features, head, draft_ids, samples, params, opt, dev, args)}",
              flush=True)
    flops = train_flops(text_config(target.config), draft.config, tokens, args.seq, cfg.train.ttt_length,
                        draft.config.draft_vocab_size)
    mfu = flops / elapsed / peak_flops()
    peak = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:  # after the figures are taken, so that a failure here costs only the profile
        try:
            profile_step(f"{shape} {name}", cfg, draft, features, head, draft_ids, samples, params, opt, dev, args)
        except Exception as e:
            print(f"{shape} {name}: profile failed: {type(e).__name__}: {e}", flush=True)
    total = sum(spent.values())
    share = " | ".join(f"{spent[p] / total:.0%}" for p in PHASES)
    row = f"| {shape} | {name} | {tps:,.0f} | {mfu:.1%} | {peak:.1f} | {share} |"
    set_deterministic(False)
    losses = torch.stack(losses).float().cpu()
    del draft, opt, params, features
    gc.collect()
    torch.cuda.empty_cache()
    return row, losses


def train_step(cfg, draft, features, head, draft_ids, batch, params, opt, dev, mark=None) -> torch.Tensor:
    """One training step (forward, backward, clip, AdamW); returns its loss. `mark()`, if given, is called as each
    phase starts (target, draft forward + loss, backward, optimizer) and at the end: the timed loop records an
    event there, the profile a mark kernel."""
    mark = mark or (lambda: None)
    mark()
    loss, _ = run_batch(cfg, draft, features, head, draft_ids, batch, dev, mark=mark)
    mark()
    loss.backward()
    mark()
    grad_norm = clip_gradients(opt, params, cfg.train.grad_clip, clips_in_adamw(cfg, dev))
    apply_update(opt, loss.detach(), grad_norm, defers_reads(cfg, dev))  # the loop's skip of a non-finite step
    opt.zero_grad(set_to_none=True)
    mark()
    return loss


def host_syncs(cfg, draft, features, head, draft_ids, samples, params, opt, dev, args) -> str:
    """One more step with CUDA's sync debug mode on: each operation that makes the host wait for the GPU (a
    host read, a boolean index, nonzero) warns once per call. Every such wait drains the GPU's queue, so the
    host's launch work for what follows cannot overlap the GPU's work; for a small target, whose step is
    bound by launches, they decide how much of the step the two overlap."""
    batch = collate(samples[:args.batch])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(cfg, draft, features, head, draft_ids, batch, params, opt, dev)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    top = ", ".join(f"{k} x{v}" for k, v in where.most_common(8))
    return f"host syncs in one step (forward, backward, clip, AdamW): {sum(where.values())} ({top})"


# Kernel kinds by name, first match wins (cuBLAS/CUTLASS matmuls, the compiled flex attention, our loss kernels,
# AdamW, copies; the rest is element-wise and reduction work, eager or compiled).
KINDS = (("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
         ("flex attention", ("flex", "triton_tem")),
         ("fused loss", ("soft_ce",)),
         ("optimizer", ("adam", "multi_tensor")),
         ("copy", ("memcpy", "memset", "direct_copy", "copy_kernel")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "element-wise / reduction")


# A profiled step's phases are told apart by marks in its kernel stream: torch.cuda._sleep's kernel (the profiler
# names it at::cuda::(anonymous namespace)::spin_kernel(long)), launched at each phase's start and at the step's
# end (one stream, so the kernels run in launch order between them).
MARK = "spin_kernel("
PHASES = ("target", "draft fwd+loss", "backward", "optimizer")


def phase_after(seen: int, phases=PHASES) -> str:
    """The phase a kernel belongs to after `seen` marks (of a step's len(phases) + 1): "before" any mark, the
    phase whose mark came last, or "between steps" after a step's closing mark."""
    slot = (seen - 1) % (len(phases) + 1)
    return "before" if seen == 0 else phases[slot] if slot < len(phases) else "between steps"


def phase_split(kernels, phases=PHASES, mark: str = MARK, key=kernel_kind):
    """`kernels`: (name, start, duration) of a profile's GPU kernels, the `mark` kernels included. Returns
    {phase: {key(name): [duration, count]}} (by default by kind of kernel): a kernel belongs to the phase whose
    mark came last before it; one after a step's closing mark and before the next step's first goes to "between
    steps", one before any mark to "before". The marks themselves are not counted."""
    out = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    seen = 0
    for name, _, dur in sorted(kernels, key=lambda k: k[1]):
        if mark in name:
            seen += 1
            continue
        cell = out[phase_after(seen, phases)][key(name)]
        cell[0] += dur
        cell[1] += 1
    return out


def idle_gaps(kernels, phases=PHASES, mark: str = MARK, top: int = 6, skip_steps: int = 0):
    """Where the GPU waits: `kernels` as for `phase_split` (one stream). Returns ({phase: idle us}, the `top`
    longest gaps as (us, phase, kernel before, kernel after)). A gap is the time between the end of all work
    so far and the next kernel's start; it goes to the phase of that next kernel (whose launch came late).
    The first `skip_steps` steps are left out: a profile starts from an idle GPU, so its first step waits for
    every launch, as no later step does."""
    idle = collections.Counter()
    gaps = []
    seen, end, before = 0, None, None
    for name, start, dur in sorted(kernels, key=lambda k: k[1]):
        seen += mark in name  # a mark opens the next phase, and the wait for it belongs there
        phase = phase_after(seen, phases)
        if end is not None and start > end and seen > skip_steps * (len(phases) + 1):
            idle[phase] += start - end
            gaps.append((start - end, phase, before, name))
        end = start + dur if end is None else max(end, start + dur)
        before = name
    return idle, sorted(gaps, key=lambda g: -g[0])[:top]


def phase_table(split, steps: int) -> str:
    """Milliseconds per step of each phase by kind of kernel (the kinds as columns), as markdown."""
    spent = collections.Counter()
    for by in split.values():
        spent.update({k: v[0] for k, v in by.items()})
    kinds = [k for k, _ in spent.most_common()]
    lines = ["| phase | " + " | ".join(kinds) + " | all |", "|---" * (len(kinds) + 2) + "|"]
    for phase, by in split.items():
        cells = [f"{by[k][0] / steps / 1e3:.2f}" if k in by else "" for k in kinds]
        lines.append(f"| {phase} | " + " | ".join(cells) + f" | {sum(v[0] for v in by.values()) / steps / 1e3:.2f} |")
    return "\n".join(lines)


def profile_step(label, cfg, draft, features, head, draft_ids, samples, params, opt, dev, args, steps: int = 2):
    """`steps` more training steps under the profiler: GPU time and kernel count by kind of kernel, the same by
    phase of the step (`phase_split`), and the costliest kernels (what the draft's share of the step is made
    of, beyond the phase split)."""
    from torch.profiler import ProfilerActivity, profile

    def mark():
        torch.cuda._sleep(1)

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            train_step(cfg, draft, features, head, draft_ids, collate(samples[i:i + args.batch]), params, opt, dev,
                       mark=mark)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.count > 0 and MARK not in e.key]
    total = sum(e.device_time_total for e in kernels) / steps
    if not total:
        print(f"\n### {label}: the profiler recorded no GPU kernels", flush=True)
        return
    by = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        kind = by[kernel_kind(e.key)]
        kind[0] += e.device_time_total / steps
        kind[1] += e.count / steps
    print(f"\n### {label}: one step's kernels, {total / 1e3:.1f} ms of GPU time")
    print("| kind | ms | share | kernels |\n|---|---|---|---|")
    for kind, (us, n) in sorted(by.items(), key=lambda kv: -kv[1][0]):
        print(f"| {kind} | {us / 1e3:.2f} | {us / total:.0%} | {n:.0f} |")
    timed = [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
             if e.device_type.name == "CUDA"]
    print(f"\nby phase, ms per step:\n{phase_table(phase_split(timed), steps)}")
    idle, longest = idle_gaps(timed, skip_steps=1)
    n = steps - 1
    print(f"\nGPU idle between kernels, ms per step after the first: {sum(idle.values()) / n / 1e3:.2f} ("
          + ", ".join(f"{p} {us / n / 1e3:.2f}" for p, us in idle.most_common()) + "); longest gaps:")
    for us, phase, before, after in longest:
        print(f"- {us / 1e3:.2f} ms in {phase}: after {(before or '')[:60]}, before {after[:60]}")
    print("\ncostliest kernels:")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:15]:
        ms = e.device_time_total / steps / 1e3
        print(f"- {e.count / steps:.0f} x {e.key[:100]} ({kernel_kind(e.key)}): {ms:.2f} ms")
    if args.profile_top:
        for phase, names in phase_split(timed, key=str).items():
            print(f"\ncostliest kernels in {phase}, per step:")
            for name, (us, n) in sorted(names.items(), key=lambda kv: -kv[1][0])[:args.profile_top]:
                print(f"- {n / steps:.0f} x {name[:110]} ({kernel_kind(name)}): {us / steps / 1e3:.3f} ms")
    print(flush=True)


def main():
    # cuBLAS reads its workspace setting once: set it before any GPU work so a deterministic variant can run.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", help="model shape(s); default llama3.1-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None,
                    help="reduced depth (every layer's shape real); aux layers become [1, N//2, N-1]")
    ap.add_argument("--repeat", action="store_true", help="run each variant twice: are the losses bitwise equal?")
    ap.add_argument("--losses", default=None, help="write each variant's step losses to this JSON file (to compare "
                    "two versions of the code bit for bit)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="after the timed steps, count the step's host syncs and where they happen")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, GPU time and kernel count per kind of kernel (all, and per phase "
                    "of the step), and the costliest kernels")
    ap.add_argument("--profile-top", type=int, default=0, metavar="N",
                    help="with --profile: also the N costliest kernels of each phase")
    ap.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                    help="a named set of train.* overrides; repeatable (default: the config's defaults)")
    args = ap.parse_args()
    variants = [(v[0], v[1:]) for v in args.variant] if args.variant else [("default", [])]
    print(f"\n## online training, {torch.cuda.get_device_name()}, bf16, rows of {args.seq} tokens, "
          f"batch {args.batch}, {args.steps} steps after {args.warmup} warm-up"
          + (f", targets cut to {args.layers} layers" if args.layers else ""))
    print("| target shape | variant | tokens/s | MFU | peak GiB | target fwd | draft fwd+loss | backward | optimizer |"
          + (" repeat: losses bitwise equal |" if args.repeat else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.repeat else ""))
    written = {}
    for shape in args.shape or ["llama3.1-8b"]:
        target = random_target(shape, torch.device("cuda"), num_layers=args.layers)
        g = torch.Generator().manual_seed(0)
        vocab = target.config.vocab_size
        samples = []
        for i in range(16):
            tok = torch.randint(0, vocab, (args.seq,), generator=g)
            mask = torch.zeros(args.seq, dtype=torch.bool)
            mask[args.seq // 16:] = True  # a prompt, then the answer the draft learns
            samples.append(Sample(tok, mask, id=str(i)))
        for name, overrides in variants:
            try:
                row, losses = run_variant(name, shape, target, samples, overrides, args)
            except Exception as e:  # one failing variant should not hide the others' numbers
                print(f"| {shape} | {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} |", flush=True)
                set_deterministic(False)
                continue
            if args.repeat:
                again = run_variant(name, shape, target, samples, overrides, args)[1]
                same = torch.equal(losses, again)
                row += f" {'yes' if same else 'no, max diff %.2e' % (losses - again).abs().max()} |"
            print(row, flush=True)
            written[f"{shape} {name}"] = [float.hex(x) for x in losses.double().tolist()]
            if args.losses:
                write_text(args.losses, json.dumps(written, indent=1))
        del target
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
