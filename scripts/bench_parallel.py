"""Online training on several GPUs (or CPU processes): tokens/s per GPU, peak memory per GPU, against one.

Launch under torchrun. Every rank builds its slices of the same random-weight target of a real shape (split
over the tp ranks with `parallelize_target` before any weight is materialised, when tp > 1) and the draft
sharded with FSDP2, then runs the training step of `specforge train` (the same functions: dp rows, globally
normalised loss, summed gradients).

  torchrun --nproc-per-node 1 scripts/bench_parallel.py --shape llama3.1-8b                # the baseline
  torchrun --nproc-per-node 2 scripts/bench_parallel.py --shape llama3.1-8b                # dp=2
  torchrun --nproc-per-node 2 scripts/bench_parallel.py --shape llama3.1-8b --tp 2         # tp=2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as tdist

from specforge.config import load_config
from specforge.data.batching import collate
from specforge.data.template import Sample
from specforge.data.vocab import build_vocab, count_tokens
from specforge.eagle3.train import OnlineFeatures, build_draft, compiles_target, run_batch
from specforge.model_shapes import random_target
from specforge.parallel.data import dp_rows
from specforge.parallel.draft import backward, replicated, replicated_head, shard_draft
from specforge.parallel.mesh import init_distributed, is_main, shutdown
from specforge.targets import TargetHead, aux_layer_ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=1, help="rows per GPU per step (global batch = rows x dp)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    depth = [f"target.aux_layer_ids=[1,{args.layers // 2},{args.layers - 1}]"] if args.layers else []
    probe = load_config(args.shape, overrides=[f"parallel.tp_size={args.tp}", *depth, *args.overrides])
    dist = init_distributed(probe)
    cfg = load_config(args.shape, overrides=[f"parallel.tp_size={args.tp}", f"train.batch_size={args.rows * dist.dp}",
                                             f"data.max_length={args.seq}", f"device={dist.device}", *depth,
                                             *args.overrides])
    dev = dist.device
    # Split while built: each rank materialises only its slices of the target.
    target = random_target(args.shape, dev, num_layers=args.layers, tp_mesh=dist.tp_mesh if dist.tp > 1 else None)
    ids = aux_layer_ids(cfg.target, target)
    head = replicated_head(TargetHead.from_model(target))
    vocab = head.embed.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(16 * dist.dp):
        tok = torch.randint(0, vocab, (args.seq,), generator=g)
        mask = torch.zeros(args.seq, dtype=torch.bool)
        mask[args.seq // 16:] = True
        samples.append(Sample(tok, mask, id=str(i)))
    d2t, t2d = build_vocab(count_tokens(samples, vocab), min(cfg.target.draft.draft_vocab_size, vocab))
    draft = shard_draft(build_draft(cfg, head, ids, d2t, t2d, dist), dist)
    draft_ids = draft.target_ids().to(dev)
    features = OnlineFeatures(target, ids, compiles_target(cfg, dev, dist))  # as `specforge train` builds it
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, tokens, t0 = [], 0, 0.0
    for i in range(args.steps + args.warmup):
        if i == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
        rows = [samples[(i * cfg.train.batch_size + r) % len(samples)] for r in range(cfg.train.batch_size)]
        batch = collate(rows)
        tokens += batch.num_tokens  # the global batch
        batch = dp_rows(batch, dist).to(dev)
        loss, _ = run_batch(cfg, draft, features, head, draft_ids, batch, dev, dist=dist)
        backward(loss, dist)
        replicated(torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=dev)
    if dist.world > 1:
        tdist.all_reduce(peak, op=tdist.ReduceOp.MAX)
    if is_main(dist):
        name = torch.cuda.get_device_name() if cuda else "CPU"
        print(f"| {args.shape}{f' ({args.layers} layers)' if args.layers else ''} | {name} | {dist.world} "
              f"| dp={dist.dp} tp={dist.tp} | {cfg.train.batch_size} x {args.seq} | {tokens / elapsed:,.0f} "
              f"| {tokens / elapsed / dist.world:,.0f} | {peak.item():.1f} |", flush=True)
    features.close()
    shutdown(dist)


if __name__ == "__main__":
    main()
