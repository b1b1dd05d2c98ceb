"""Offline mode on a GPU with a random-weight target of a real shape (speed only).

Prints: the plain target forward's tokens/s at a batch, `dump-hidden`'s tokens/s at the same batch
(hooks, copies to the host, shard writing overlapped), bytes per token on disk, and training tokens/s
offline (features read from the dump) and online (target in the loop), with peak GPU memory.

  python scripts/bench_dump.py --shape llama3.1-8b --batch 4 --seq 2048 --samples 64 --out /tmp/dump
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from specforge.config import load_config
from specforge.data.shards import DumpIdentity, load_manifest, samples_sha256
from specforge.data.template import Sample
from specforge.data.vocab import build_vocab, count_tokens
from specforge.data.shards import shard_bounds, write_shard
from specforge.dump import _features, write_dump
from specforge.data.sources import MemorySource, ShardSource
from specforge.eagle3.train import OfflineFeatures, OnlineFeatures, build_draft, run_batch
from specforge.model_shapes import random_target
from specforge.targets import FeatureCapture, TargetHead, aux_layer_ids, config_sha256, decoder_model


def cuda_time(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def train_speed(cfg, draft, features, head, source, steps: int) -> tuple[float, float]:
    """tokens/s over `steps` optimizer steps (after 2 warm-up steps), and peak GPU memory in GiB."""
    device = torch.device("cuda")
    draft_ids = draft.target_ids().to(device)
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-4)
    batches = source.train_batches(0)
    torch.cuda.reset_peak_memory_stats()
    tokens, t0 = 0, None
    for i in range(steps + 2):
        if i == 2:
            torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
        batch = next(batches).to(device)
        loss, _ = run_batch(cfg, draft, features, head, draft_ids, batch, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.num_tokens
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0), torch.cuda.max_memory_allocated() / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=320)
    ap.add_argument("--shard-tokens", type=int, default=65536)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--out", default="/tmp/specforge-dump")
    args = ap.parse_args()
    dev = torch.device("cuda")
    target = random_target(args.shape, dev)
    cfg = load_config(args.shape, overrides=["device=cuda", "train.batch_size=1", "data.eval_every=0"])
    ids = aux_layer_ids(cfg.target, target)
    g = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    samples = []
    for i in range(args.samples):
        tok = torch.randint(0, vocab, (args.seq,), generator=g)
        mask = torch.zeros(args.seq, dtype=torch.bool)
        mask[args.seq // 16:] = True
        samples.append(Sample(tok, mask, id=str(i)))

    base = decoder_model(target)
    x = torch.stack([s.input_ids for s in samples[:args.batch]]).to(dev)
    with torch.no_grad():
        for _ in range(2):
            base(input_ids=x, use_cache=False)
        fwd = statistics.median(cuda_time(lambda: base(input_ids=x, use_cache=False)) for _ in range(5))
    plain_tps = x.numel() / fwd

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    identity = DumpIdentity(target=args.shape, target_config_sha256=config_sha256(target.config),
                            aux_layer_ids=ids, dtype=args.dtype, data_sha256=samples_sha256(samples),
                            num_samples=len(samples))
    tokens = sum(len(s.input_ids) for s in samples)
    # Where the time goes: features alone (forward + hooks + copies to the host), then one shard written
    # alone (serialise + hash + fsync), then the whole dump with the two overlapped.
    bounds = shard_bounds([len(s.input_ids) for s in samples], args.shard_tokens)
    capture = FeatureCapture(target, ids)
    first = samples[bounds[0]:bounds[1]]
    with torch.no_grad():
        _features(capture, first[:args.batch], args.batch, dev)
        feat_s = cuda_time(lambda: _features(capture, first, args.batch, dev))
        rows = _features(capture, first, args.batch, dev)
    capture.remove()
    scratch = out.with_name(out.name + "-write")
    scratch.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    entry = write_shard(scratch, 0, rows, args.dtype)
    write_s = time.perf_counter() - t
    shutil.rmtree(scratch)
    del rows
    shard_tok = sum(len(s.input_ids) for s in first)
    dump_s = cuda_time(lambda: write_dump(target, samples, ids, identity, out, args.shard_tokens, args.batch, dev))
    m = load_manifest(out)
    # The last shard's write cannot overlap any compute: the steady rate leaves it out.
    steady = (tokens - m.shards[-1]["tokens"]) / max(1e-9, dump_s - write_s * m.shards[-1]["tokens"] / shard_tok)

    head = TargetHead.from_model(target)
    d2t, t2d = build_vocab(count_tokens(samples, vocab), cfg.target.draft.draft_vocab_size)
    draft = build_draft(cfg, head, ids, d2t, t2d)
    offline_tps, offline_mem = train_speed(cfg, draft, OfflineFeatures(head.norm), head,
                                           ShardSource(cfg, out, m, window=2, pad_id=0), args.train_steps)
    draft = build_draft(cfg, head, ids, d2t, t2d)
    online_tps, online_mem = train_speed(cfg, draft, OnlineFeatures(target, ids), head,
                                         MemorySource(samples, [], 1, 0, 0), args.train_steps)
    name = torch.cuda.get_device_name()
    print(f"\n## offline mode, {args.shape} random weights, {name}, bf16, rows of {args.seq} tokens")
    print("| measure | value |")
    print("|---|---|")
    print(f"| plain target forward, batch {args.batch} | {plain_tps:,.0f} tokens/s |")
    print(f"| dump-hidden ({args.dtype}), batch {args.batch}, {tokens:,} tokens | {tokens / dump_s:,.0f} tokens/s "
          f"({tokens / dump_s / plain_tps:.0%} of the plain forward) |")
    print(f"| features only (forward + hooks + copies to host) | {shard_tok / feat_s:,.0f} tokens/s "
          f"({shard_tok / feat_s / plain_tps:.0%}) |")
    print(f"| one shard written alone ({entry['bytes'] / 2**30:.2f} GiB: serialise + sha256 + fsync) | "
          f"{entry['bytes'] / write_s / 2**30:.2f} GiB/s = {shard_tok / write_s:,.0f} tokens/s |")
    print(f"| dump steady rate (all but the last shard's unoverlapped write) | {steady:,.0f} tokens/s "
          f"({steady / plain_tps:.0%}) |")
    print(f"| bytes per token on disk | {m.bytes / m.tokens:,.0f} (hidden {target.config.hidden_size}) |")
    print(f"| offline training, 1 row per step | {offline_tps:,.0f} tokens/s, peak {offline_mem:.1f} GiB |")
    print(f"| online training, 1 row per step | {online_tps:,.0f} tokens/s, peak {online_mem:.1f} GiB |")


if __name__ == "__main__":
    main()
