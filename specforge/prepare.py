"""The training data, assembled: conversations from files or answered by the target (`specforge prepare-data`),
tokenised with the chat template, and the draft vocabulary built from them (`specforge build-vocab`).

Training (online), dump-hidden and build-vocab all read the data through `load_samples`, so they hold out
and tokenise the same conversations."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .config import Config
from .data.conversations import DataError, bundled_path, read_jsonl, write_jsonl
from .data.regenerate import regenerate
from .data.shards import load_manifest
from .data.sources import ShardSource, is_held_out, prompt_groups
from .data.tables import Table, open_table, read_prompts
from .data.template import ensure_chat_template, prompt_ids, tokenize_table
from .data.vocab import build_vocab, count_tokens, coverage, load_vocab, save_vocab
from .generate import Request, generate, request_key, stop_ids
from .parallel.mesh import Dist, barrier, exists_everywhere, is_main
from .synthesize import synthesize
from .targets import decoder_parts, load_target, load_target_head, resolve_device, resolve_dtype


def prepare_data(cfg: Config, model=None, tok=None, write: bool = True, dist: Optional[Dist] = None) -> Path:
    """Answer the prompts with the target and write the conversations as JSONL (`write=False`: generate
    only; the other ranks of a run, whose target shards rank 0 needs in every forward). The prompts: a file,
    requests the target writes itself (prepare.synthesize), or both."""
    pc = cfg.prepare
    check_prepare(pc)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(pc.dtype, device)
    if model is None or next(model.parameters()).dtype != dtype:
        model, tok = load_target(cfg.target, device, dtype)
    ensure_chat_template(tok, cfg.data.chat_template)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    convs, origin = [], []
    if pc.prompts or not pc.synthesize:
        src = pc.prompts or bundled_path("train_prompts.jsonl")
        convs = read_prompts(str(src), cfg.data)[: pc.limit]
        origin.append(f"{len(convs)} from {src}")
    if pc.synthesize:
        t0 = time.perf_counter()
        synth = synthesized_prompts(cfg, model, tok, pad, write, dist)
        if write:
            took = time.perf_counter() - t0
            print(f"prepare-data: {len(synth)} synthesized prompts ready in {took:.1f} s", flush=True)
        convs += synth
        origin.append(f"{len(synth)} written by the target")
    if write:
        how = "greedy" if pc.temperature <= 0 else f"T={pc.temperature}"
        if pc.samples > 1:
            how = f"{pc.samples} each: greedy, then T={pc.temperature}"
        print(f"prepare-data: {len(convs)} prompts ({', '.join(origin)}), answers by {cfg.target.name} "
              f"({how}; max {pc.max_new_tokens} new tokens)", flush=True)
    t0 = time.perf_counter()
    out = regenerate(convs, answerer(model, tok, pc, pad), pc.samples)
    path = cfg.prepared_path()
    if not write:
        return path
    write_jsonl(path, out)
    sec = time.perf_counter() - t0
    turns = sum(m["role"] == "assistant" for c in out for m in c.messages)
    print(f"prepare-data: wrote {path} ({len(out)} conversations, {turns} answers in {sec:.1f} s, "
          f"{turns / max(sec, 1e-9):.1f} answers/s)", flush=True)
    return path


def check_prepare(pc) -> None:
    """Settings that cannot work, refused before the target loads."""
    if pc.samples < 1:
        raise SystemExit(f"prepare.samples={pc.samples}: need at least 1")
    if pc.samples > 1 and pc.temperature <= 0:
        raise SystemExit(f"prepare.samples={pc.samples} needs prepare.temperature > 0 (the answers after the "
                         "first are sampled)")
    if pc.synthesize < 0:
        raise SystemExit(f"prepare.synthesize={pc.synthesize}: need 0 or more")
    if pc.synthesize:
        if pc.synth_turns not in (1, 2):
            raise SystemExit(f"prepare.synth_turns={pc.synth_turns}: choose 1 or 2")
        if pc.synth_temperature <= 0:
            raise SystemExit(f"prepare.synth_temperature={pc.synth_temperature}: synthesis samples (need > 0)")
        if not 0 < pc.synth_max_similarity <= 1:
            raise SystemExit(f"prepare.synth_max_similarity={pc.synth_max_similarity}: need a value in (0, 1]")
    if pc.batch_size is not None and pc.batch_size < 1:
        raise SystemExit(f"prepare.batch_size={pc.batch_size}: need at least 1 (or leave it out: automatic)")


def answerer(model, tok, pc, pad: int):
    """The `answer` function regenerate calls: one batched generation over every history of a turn. Sample 0
    of a prompt is greedy when there are several (else at prepare.temperature); each sampled answer has its
    own key, from its prompt id, sample and turn, so it does not depend on the batch it lands in."""
    stop = stop_ids(tok, model)

    def answer(histories, jobs, turn):
        reqs = [Request(prompt_ids(tok, h), 0.0 if k == 0 and pc.samples > 1 else pc.temperature,
                        request_key("answer", cid, k, turn)) for h, (cid, k) in zip(histories, jobs)]
        outs = generate(model, reqs, pc.max_new_tokens, stop, pad, seed=pc.seed, batch_size=pc.batch_size,
                        prefill_tokens=pc.prefill_tokens, sync_every=pc.sync_every, cuda_graphs=pc.cuda_graphs,
                        desc=f"answering turn {turn + 1}")
        return [tok.decode(g.tokens, skip_special_tokens=True).strip() for g in outs]

    return answer


def synthesized_prompts(cfg: Config, model, tok, pad: int, write: bool, dist: Optional[Dist] = None):
    """prepare.synthesize requests written by the target, read back from cfg.synthesized_path() when an
    earlier run left at least that many there, else written anew (and saved by the writing rank)."""
    n, path = cfg.prepare.synthesize, cfg.synthesized_path()
    if exists_everywhere(dist, path):
        kept = list(read_jsonl(path))
        if len(kept) >= n:
            if write:
                print(f"prepare-data: {n} synthesized prompts read from {path} (delete it to write new ones)",
                      flush=True)
            return kept[:n]
    convs = synthesize(model, tok, cfg.prepare, n, pad)
    if write:
        write_jsonl(path, convs)
        print(f"prepare-data: wrote {len(convs)} synthesized prompts to {path}", flush=True)
    return convs


def training_table(cfg: Config, model, tok, dist: Optional[Dist] = None) -> Table:
    """The training conversations before the held-out split. Without data.train_path: the bundled
    prompts answered by the target (prepared once, then read back). Every rank generates (a tensor-parallel
    target needs all of them), rank 0 writes, and all read the file back."""
    path = cfg.data.train_path
    if path is None:
        path = cfg.prepared_path()
        if not exists_everywhere(dist, path):
            prepare_data(cfg, model, tok, write=is_main(dist), dist=dist)
            barrier(dist)
    with main_first(dist):
        table = open_table(str(path), cfg.data, need_answer=True, label="data.train_path")
    if not len(table):
        raise DataError(f"{path}: no conversations in the file")
    return table


def load_tables(cfg: Config, model, tok, dist: Optional[Dist] = None) -> tuple[Table, Optional[Table]]:
    """(training conversations, held-out conversations of data.eval_path or None)."""
    table = training_table(cfg, model, tok, dist)
    if not cfg.data.eval_path:
        return table, None
    with main_first(dist):
        return table, open_table(cfg.data.eval_path, cfg.data, need_answer=True, label="data.eval_path")


def load_conversations(cfg: Config, model, tok, dist: Optional[Dist] = None):
    """load_tables as lists of Conversations."""
    table, held = load_tables(cfg, model, tok, dist)
    return table.conversations(), held.conversations() if held is not None else None


def load_samples(cfg: Config, model, tok, dist: Optional[Dist] = None):
    """Tokenised (training, held-out) samples. Without data.eval_path the held-out split counts tokenised
    samples, as the dump stores them, so online and offline training hold out the same conversations even
    where data.too_long=drop or data.on_error=skip left some out."""
    table, held = load_tables(cfg, model, tok, dist)
    with main_first(dist):
        samples = tokenize_table(tok, table, cfg.data)
        if held is not None:
            return samples, tokenize_table(tok, held, cfg.data, "held-out conversations")
    held = [is_held_out(cfg, g) for g in prompt_groups([s.id for s in samples])]
    return [s for s, h in zip(samples, held) if not h], [s for s, h in zip(samples, held) if h]


@contextmanager
def main_first(dist: Optional[Dist]):
    """Rank 0 reads and tokenises first, filling the data cache; the other ranks then read the cache
    instead of each running its own pool over the same data. A failure on rank 0 still lets them go on
    (to fail the same way)."""
    if not is_main(dist):
        barrier(dist)
    try:
        yield
    finally:
        if is_main(dist):
            barrier(dist)


def vocab_for(cfg: Config, samples, target_vocab: int, draft_vocab: int, dist: Optional[Dist] = None):
    """The draft vocab: read from its file, else built from the samples and written (by rank 0; every rank
    builds the same one)."""
    path = cfg.vocab_path()
    if exists_everywhere(dist, path):
        return load_vocab(path, target_vocab, draft_vocab)
    counts = count_tokens(samples, target_vocab)
    d2t, t2d = build_vocab(counts, draft_vocab)
    if not is_main(dist):
        return d2t, t2d
    save_vocab(path, d2t, t2d, counts)
    print(f"draft vocab: {draft_vocab} of {target_vocab} tokens cover {coverage(counts, t2d):.1%} "
          f"of assistant tokens; wrote {path}", flush=True)
    return d2t, t2d


def open_dump(cfg: Config):
    """(folder, manifest) of the complete dump that offline training reads, or an error saying what to run."""
    folder = Path(cfg.train.hidden) if cfg.train.hidden else cfg.dump_dir()
    manifest = load_manifest(folder)
    if manifest is None:
        raise SystemExit(f"{folder}: no dump here (run `specforge dump-hidden` first, or pass --hidden DIR)")
    if not manifest.complete:
        raise SystemExit(f"{folder}: the dump is incomplete ({len(manifest.shards)} shards); rerun dump-hidden")
    return folder, manifest


def build_vocab_cmd(cfg: Config) -> Path:
    """`specforge build-vocab`: (re)build d2t/t2d from the loss-masked tokens of the training data, read
    the way training reads it (online: tokenised conversations; offline: the dump's ids and masks)."""
    device = resolve_device(cfg.device)
    if cfg.train.mode == "online":
        target, tok = load_target(cfg.target, device)
        ensure_chat_template(tok, cfg.data.chat_template)
        samples = load_samples(cfg, target, tok)[0]
        vocab_size = decoder_parts(target)[0].weight.shape[0]
    else:
        folder, manifest = open_dump(cfg)
        source = ShardSource(cfg, folder, manifest, cfg.train.shuffle_window, pad_id=0)
        samples = [s for shard in source.train_tokens() for s in shard]
        vocab_size = load_target_head(cfg.target, device).embed.weight.shape[0]
    path = cfg.vocab_path()
    path.unlink(missing_ok=True)
    vocab_for(cfg, samples, vocab_size, min(cfg.target.draft.draft_vocab_size, vocab_size))
    return path
