"""The training data, assembled: conversations from files or answered by the target (`specforge prepare-data`),
tokenised with the chat template, and the draft vocabulary built from them (`specforge build-vocab`).

Training (online), dump-hidden and build-vocab all read the data through `load_samples`, so they hold out
and tokenise the same conversations."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .config import Config
from .data.conversations import DataError, bundled_path, read_jsonl, write_jsonl
from .data.regenerate import regenerate
from .data.shards import load_manifest
from .data.sources import ShardSource, is_held_out
from .data.tables import Table, open_table
from .data.template import ensure_chat_template, tokenize_table
from .data.vocab import build_vocab, count_tokens, coverage, load_vocab, save_vocab
from .parallel.mesh import Dist, barrier, exists_everywhere, is_main
from .targets import decoder_parts, load_target, load_target_head, resolve_device, resolve_dtype


def prepare_data(cfg: Config, model=None, tok=None, write: bool = True) -> Path:
    """Answer the prompts with the target and write the conversations as JSONL (`write=False`: generate
    only; the other ranks of a run, whose target shards rank 0 needs in every forward)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.prepare.dtype, device)
    if model is None or next(model.parameters()).dtype != dtype:
        model, tok = load_target(cfg.target, device, dtype)
    ensure_chat_template(tok, cfg.data.chat_template)
    src = cfg.prepare.prompts or bundled_path("train_prompts.jsonl")
    convs = list(read_jsonl(src))[: cfg.prepare.limit]
    if write:
        print(f"prepare-data: {len(convs)} prompts from {src}, answers by {cfg.target.name} "
              f"({'greedy' if cfg.prepare.temperature == 0 else f'T={cfg.prepare.temperature}'}, "
              f"max {cfg.prepare.max_new_tokens} new tokens)", flush=True)
    out = regenerate(model, tok, convs, cfg.prepare.max_new_tokens, cfg.prepare.temperature,
                     cfg.prepare.seed, cfg.prepare.batch_size)
    path = cfg.prepared_path()
    if not write:
        return path
    write_jsonl(path, out)
    print(f"prepare-data: wrote {path}", flush=True)
    return path


def training_table(cfg: Config, model, tok, dist: Optional[Dist] = None) -> Table:
    """The training conversations before the held-out split. Without data.train_path: the bundled
    prompts answered by the target (prepared once, then read back). Every rank generates (a tensor-parallel
    target needs all of them), rank 0 writes, and all read the file back."""
    path = cfg.data.train_path
    if path is None:
        path = cfg.prepared_path()
        if not exists_everywhere(dist, path):
            prepare_data(cfg, model, tok, write=is_main(dist))
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
    return ([s for i, s in enumerate(samples) if not is_held_out(cfg, i)],
            [s for i, s in enumerate(samples) if is_held_out(cfg, i)])


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
