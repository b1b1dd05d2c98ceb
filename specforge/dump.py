"""`specforge dump-hidden`: run the target once over the training data and store its features.

Offline training then reads them back without the target in memory. The dump is resumable: shards are
complete or absent, and a rerun of the same command continues after the last complete one."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from .config import Config
from .data.batching import collate
from .data.shards import (DumpIdentity, Manifest, check_identity, load_manifest, samples_sha256, save_groups,
                          shard_bounds, write_shard)
from .data.sources import prompt_groups
from .data.template import Sample, ensure_chat_template, tokenize_table
from .prepare import training_table
from .targets import FeatureCapture, aux_layer_ids, config_sha256, load_target, resolve_device

DUMP_DTYPES = ("bfloat16", "float32", "float8")
WRITERS = 2  # shards being written at once (hashing and file writes release the GIL)


def dump_hidden(cfg: Config) -> Path:
    if cfg.dump.dtype not in DUMP_DTYPES:
        raise SystemExit(f"dump.dtype={cfg.dump.dtype!r}: choose one of {', '.join(DUMP_DTYPES)}")
    device = resolve_device(cfg.device)
    target, tok = load_target(cfg.target, device)
    ensure_chat_template(tok, cfg.data.chat_template)
    samples = tokenize_table(tok, training_table(cfg, target, tok), cfg.data)
    ids = aux_layer_ids(cfg.target, target)
    identity = DumpIdentity(target=cfg.target.name, target_config_sha256=config_sha256(target.config),
                            aux_layer_ids=ids, dtype=cfg.dump.dtype, data_sha256=samples_sha256(samples),
                            num_samples=len(samples))
    return write_dump(target, samples, ids, identity, cfg.dump_dir(), cfg.dump.shard_tokens, cfg.dump.batch_size,
                      device)


def write_dump(target, samples: list[Sample], ids: list[int], identity: DumpIdentity, out: Path,
               shard_tokens: int, batch_size: int, device) -> Path:
    """The dump loop proper (also used by scripts/bench_dump.py on random-weight targets)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(out)
    if manifest is not None:
        check_identity(manifest.identity, identity, out)
        if manifest.shard_tokens != shard_tokens:
            raise SystemExit(f"{out}: dump was started with dump.shard_tokens={manifest.shard_tokens}; "
                             f"resume with the same value")
        if manifest.complete:
            print(f"dump-hidden: {out} is complete ({manifest.tokens} tokens in {len(manifest.shards)} shards)")
            return out
    else:
        manifest = Manifest(identity=identity, shard_tokens=shard_tokens)
    if manifest.groups is None:  # new, or begun before groups were recorded (same samples: identity checked)
        manifest.groups = prompt_groups([s.id for s in samples])
        save_groups(out, manifest.groups)  # before any manifest that says "grouped"
    for stale in out.glob("*.tmp"):  # a shard or manifest half-written by a killed run
        stale.unlink()
    bounds = shard_bounds([len(s.input_ids) for s in samples], shard_tokens)
    num_shards = len(bounds) - 1
    done = len(manifest.shards)
    if done:
        print(f"dump-hidden: resuming after {done} complete shards of {num_shards}")
    capture = FeatureCapture(target, ids)
    total = sum(len(s.input_ids) for s in samples)
    bar = tqdm(total=total, initial=manifest.tokens, desc="dump-hidden", unit="tok", unit_scale=True)
    t0, tokens0 = time.perf_counter(), manifest.tokens
    # Writer threads: shards are serialised, hashed and written while the target computes the next ones;
    # the manifest still takes them in order, so it never lists a shard after a missing one.
    pending = deque()
    with ThreadPoolExecutor(max_workers=WRITERS) as writer:
        for index in range(done, num_shards):
            rows = _features(capture, samples[bounds[index]:bounds[index + 1]], batch_size, device)
            while len(pending) >= WRITERS:
                _record(manifest, pending.popleft().result(), out, bar, t0, tokens0)
            pending.append(writer.submit(write_shard, out, index, rows, identity.dtype))
        while pending:
            _record(manifest, pending.popleft().result(), out, bar, t0, tokens0)
    bar.close()
    capture.remove()
    manifest.complete = True
    manifest.save(out)
    print(f"dump-hidden: {manifest.tokens} tokens, {len(manifest.shards)} shards, "
          f"{manifest.bytes / max(1, manifest.tokens):.0f} bytes/token ({identity.dtype}) in {out}")
    return out


def _record(manifest: Manifest, entry: dict, out: Path, bar, t0: float, tokens0: int) -> None:
    manifest.shards.append(entry)
    manifest.save(out)
    bar.update(entry["tokens"])
    rate = (manifest.tokens - tokens0) / (time.perf_counter() - t0)
    bar.set_postfix(tok_s=f"{rate:.0f}", written=f"{manifest.bytes / 2**20:.0f}MiB")


def _features(capture: FeatureCapture, chunk: list[Sample], batch_size: int, device) -> list[Sample]:
    """Target features of each sample, batched by similar length; returned in the chunk's order.
    On a GPU the copies to the host go to pinned memory without blocking, so the next batch's forward is
    queued at once; one synchronisation at the end of the shard."""
    order = sorted(range(len(chunk)), key=lambda i: len(chunk[i].input_ids))
    rows: list = [None] * len(chunk)
    cuda = torch.device(device).type == "cuda"
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch = collate([chunk[i] for i in idx]).to(device)
        f = capture.run(batch.input_ids)  # right-padded rows: causal attention needs no mask (as OnlineFeatures)
        aux, prenorm = _to_host(f.aux, cuda), _to_host(f.prenorm, cuda)
        for r, i in enumerate(idx):
            n = len(chunk[i].input_ids)
            rows[i] = Sample(chunk[i].input_ids, chunk[i].loss_mask, chunk[i].id, aux[r, :n], prenorm[r, :n])
    if cuda:
        torch.cuda.current_stream().synchronize()
    return rows


def _to_host(x: torch.Tensor, cuda: bool) -> torch.Tensor:
    if not cuda:
        return x.clone()  # the capture's tensors are reused by the next forward
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)
