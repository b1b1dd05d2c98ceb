"""The training loop: data -> target features -> TTT loss -> AdamW -> checkpoints.

One loop for every feature source; online mode reads the target through forward hooks."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config
from ..data.batching import collate, epoch_batches
from ..data.conversations import DataError, bundled_path, needs_answers, read_jsonl, write_jsonl
from ..data.regenerate import regenerate
from ..data.template import ensure_chat_template, tokenize_conversation
from ..data.vocab import build_vocab, count_tokens, coverage, load_vocab, save_vocab
from ..targets import FeatureCapture, aux_layer_ids, decoder_parts, load_target, resolve_device, resolve_dtype
from .checkpoint import load_draft, save_draft
from .draft import Eagle3Draft, draft_config, init_draft_weights, param_count
from .ttt import shift_left, soft_labels, ttt_loss


def prepared_path(cfg: Config) -> Path:
    return Path(cfg.prepare.out) if cfg.prepare.out else cfg.output_dir() / "prepared.jsonl"


def prepare_data(cfg: Config, model=None, tok=None) -> Path:
    """Answer the prompts with the target and write the conversations as JSONL."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.prepare.dtype, device)
    if model is None or next(model.parameters()).dtype != dtype:
        model, tok = load_target(cfg.target, device, dtype)
    ensure_chat_template(tok, cfg.data.chat_template)
    src = cfg.prepare.prompts or bundled_path("train_prompts.jsonl")
    convs = list(read_jsonl(src))[: cfg.prepare.limit]
    print(f"prepare-data: {len(convs)} prompts from {src}, answers by {cfg.target.name} "
          f"({'greedy' if cfg.prepare.temperature == 0 else f'T={cfg.prepare.temperature}'}, "
          f"max {cfg.prepare.max_new_tokens} new tokens)", flush=True)
    out = regenerate(model, tok, convs, cfg.prepare.max_new_tokens, cfg.prepare.temperature,
                     cfg.prepare.seed, cfg.prepare.batch_size)
    path = prepared_path(cfg)
    write_jsonl(path, out)
    print(f"prepare-data: wrote {path}", flush=True)
    return path


def load_splits(cfg: Config, model, tok):
    """(train, eval) conversations. Without data.train_path, the bundled prompts answered by the target."""
    path = cfg.data.train_path
    if path is None:
        path = prepared_path(cfg)
        if not path.is_file():
            prepare_data(cfg, model, tok)
    convs = list(read_jsonl(path))
    unanswered = [c.meta["source"] for c in convs if needs_answers(c)]
    if unanswered:
        raise DataError(f"{unanswered[0]}: conversation has no assistant turn "
                        f"({len(unanswered)} such; run `specforge prepare-data` to answer prompts)")
    if cfg.data.eval_path:
        return convs, list(read_jsonl(cfg.data.eval_path))
    k = cfg.data.eval_every
    return [c for i, c in enumerate(convs) if i % k != k - 1], [c for i, c in enumerate(convs) if i % k == k - 1]


def vocab_for(cfg: Config, samples, target_vocab: int, draft_vocab: int):
    path = Path(cfg.data.vocab_path) if cfg.data.vocab_path else cfg.output_dir() / "vocab.safetensors"
    if path.is_file():
        return load_vocab(path, target_vocab, draft_vocab)
    counts = count_tokens(samples, target_vocab)
    d2t, t2d = build_vocab(counts, draft_vocab)
    save_vocab(path, d2t, t2d, counts)
    print(f"draft vocab: {draft_vocab} of {target_vocab} tokens cover {coverage(counts, t2d):.1%} "
          f"of assistant tokens; wrote {path}", flush=True)
    return d2t, t2d


def build_draft(cfg: Config, target, d2t, t2d) -> Eagle3Draft:
    embed, _, norm, lm_head = decoder_parts(target)
    dcfg = draft_config(target.config, cfg.target.draft, embed.weight.shape[0], aux_layer_ids(cfg.target, target))
    if cfg.train.init_from:
        draft = load_draft(cfg.train.init_from, embed, device=embed.weight.device)
    else:
        draft = Eagle3Draft(dcfg, embed)
        init_draft_weights(draft, seed=cfg.train.seed)
        draft.set_vocab(d2t, t2d)
        if cfg.train.init_head_from_target:
            with torch.no_grad():
                draft_ids = torch.arange(d2t.numel()) + d2t
                draft.lm_head.weight.copy_(lm_head.weight[draft_ids.to(lm_head.weight.device)].float())
                draft.norm.weight.copy_(norm.weight.float())
    return draft.to(embed.weight.device, dtype=torch.float32)


def lr_lambda(cfg: Config, total_steps: int):
    warm, floor = cfg.train.warmup_steps, cfg.train.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class OnlineFeatures:
    """Target features for a batch, computed by running the target with hooks."""

    def __init__(self, target, layer_ids, draft: Eagle3Draft):
        self.capture = FeatureCapture(target, layer_ids)
        _, _, _, lm_head = decoder_parts(target)
        self.lm_head_weight = lm_head.weight
        self.draft_ids = torch.arange(draft.d2t.numel(), device=draft.d2t.device) + draft.d2t

    def __call__(self, batch):
        f = self.capture.run(batch.input_ids, batch.attention_mask)
        # Labels are needed where the next token is trained on (the TTT loss never looks elsewhere).
        needed = shift_left(batch.loss_mask, 1, False)
        return f.aux, soft_labels(f.final, self.lm_head_weight, self.draft_ids, needed)


def run_batch(cfg: Config, draft, features, batch, device):
    aux, labels = features(batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return ttt_loss(draft, batch.input_ids, batch.loss_mask, aux, labels, cfg.train.ttt_length,
                        cfg.train.step_weight, cfg.train.mask_out_of_vocab)


def summarize(stats_list) -> dict:
    """Per-step loss, accuracy and expected acceptance over several batches, and the chain estimate."""
    steps = len(stats_list[0])
    out = {}
    chain, prod = 1.0, 1.0
    for k in range(steps):
        n = sum(float(s[k].count) for s in stats_list)
        out[f"loss_{k}"] = sum(float(s[k].loss) * float(s[k].count) for s in stats_list) / max(n, 1)
        out[f"acc_{k}"] = sum(float(s[k].correct) for s in stats_list) / max(n, 1)
        out[f"accept_{k}"] = sum(float(s[k].accept) for s in stats_list) / max(n, 1)
        if k < 5:
            prod *= out[f"acc_{k}"]
            chain += prod
    out["chain_accept_len_5"] = chain
    return out


@torch.no_grad()
def evaluate(cfg, draft, features, samples, device, pad_id) -> dict:
    draft.eval()
    stats = []
    for i in range(0, len(samples), cfg.train.batch_size):
        batch = collate(samples[i:i + cfg.train.batch_size], pad_id).to(device)
        stats.append(run_batch(cfg, draft, features, batch, device)[1])
    draft.train()
    return summarize(stats)


def train(cfg: Config) -> Path:
    if cfg.train.mode != "online":
        raise SystemExit(f"train.mode={cfg.train.mode!r}: only 'online' is built so far "
                         "(offline training from `dump-hidden` shards is a separate issue)")
    from torch.utils.tensorboard import SummaryWriter

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.train.seed)
    out = cfg.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    target, tok = load_target(cfg.target, device)
    ensure_chat_template(tok, cfg.data.chat_template)
    train_convs, eval_convs = load_splits(cfg, target, tok)
    tokenize = lambda convs: [tokenize_conversation(tok, c, cfg.data.max_length) for c in convs]  # noqa: E731
    train_samples, eval_samples = tokenize(train_convs), tokenize(eval_convs)
    embed, _, _, _ = decoder_parts(target)
    vocab_size = embed.weight.shape[0]
    d2t, t2d = vocab_for(cfg, train_samples, vocab_size, min(cfg.target.draft.draft_vocab_size, vocab_size))
    draft = build_draft(cfg, target, d2t, t2d)
    features = OnlineFeatures(target, aux_layer_ids(cfg.target, target), draft)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    lengths = [len(s.input_ids) for s in train_samples]
    per_epoch = math.ceil(len(train_samples) / cfg.train.batch_size)
    total = cfg.train.max_steps or per_epoch * cfg.train.epochs
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    writer = SummaryWriter(str(out / "tb"))
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    print(f"train: target {cfg.target.name} on {device}, draft {param_count(draft) / 1e6:.1f}M params, "
          f"{len(train_samples)} train / {len(eval_samples)} eval conversations, {total} steps", flush=True)

    step, losses = 0, []
    bar = tqdm(total=total, desc="train", unit="step")
    t_last, tokens_since = time.perf_counter(), 0
    epoch = 0
    while step < total:
        for idx in epoch_batches(len(train_samples), lengths, cfg.train.batch_size, cfg.train.seed, epoch):
            if step >= total:
                break
            batch = collate([train_samples[i] for i in idx], pad_id).to(device)
            loss, stats = run_batch(cfg, draft, features, batch, device)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_since += batch.num_tokens
            loss = loss.detach()
            losses.append(loss.item())
            if step % cfg.train.log_every == 0 or step == total:
                now = time.perf_counter()
                tps = tokens_since / (now - t_last)
                t_last, tokens_since = now, 0
                m = summarize([stats])
                writer.add_scalar("train/loss", float(loss), step)
                for k in range(cfg.train.ttt_length):
                    writer.add_scalar(f"train/loss_{k}", m[f"loss_{k}"], step)
                    writer.add_scalar(f"train/acc_{k}", m[f"acc_{k}"], step)
                    writer.add_scalar(f"train/accept_{k}", m[f"accept_{k}"], step)
                writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                writer.add_scalar("train/tokens_per_s", tps, step)
                bar.set_postfix(loss=f"{float(loss):.3f}", acc0=f"{m['acc_0']:.2f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and eval_samples:
                _log_eval(writer, evaluate(cfg, draft, features, eval_samples, device, pad_id), step)
            if cfg.train.save_interval and step % cfg.train.save_interval == 0:
                save_draft(draft, out / "checkpoints" / f"step_{step:07d}", getattr(torch, cfg.train.save_dtype))
        epoch += 1
    bar.close()
    metrics = {"steps": step, "train_losses": losses}
    if eval_samples:
        metrics["eval"] = evaluate(cfg, draft, features, eval_samples, device, pad_id)
        _log_eval(writer, metrics["eval"], step)
    writer.close()
    features.capture.remove()
    final = save_draft(draft, out / "draft", getattr(torch, cfg.train.save_dtype),
                       extra={"target": cfg.target.name, "steps": step})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if eval_samples:
        ev = metrics["eval"]
        accs = " ".join(f"{ev[f'acc_{k}']:.3f}" for k in range(cfg.train.ttt_length))
        print(f"eval ({len(eval_samples)} held-out): acc_0..{cfg.train.ttt_length - 1} = {accs}; "
              f"chain acceptance-length estimate (5 steps) = {ev['chain_accept_len_5']:.2f}", flush=True)
    print(f"train: draft written to {final}", flush=True)
    return final


def _log_eval(writer, m: dict, step: int):
    for key, value in m.items():
        writer.add_scalar(f"eval/{key}", value, step)


def build_vocab_cmd(cfg: Config) -> Path:
    """`specforge build-vocab`: (re)build d2t/t2d from the loss-masked tokens of the training data."""
    device = resolve_device(cfg.device)
    target, tok = load_target(cfg.target, device)
    ensure_chat_template(tok, cfg.data.chat_template)
    train_convs, _ = load_splits(cfg, target, tok)
    samples = [tokenize_conversation(tok, c, cfg.data.max_length) for c in train_convs]
    path = Path(cfg.data.vocab_path) if cfg.data.vocab_path else cfg.output_dir() / "vocab.safetensors"
    path.unlink(missing_ok=True)
    vocab_size = decoder_parts(target)[0].weight.shape[0]
    vocab_for(cfg, samples, vocab_size, min(cfg.target.draft.draft_vocab_size, vocab_size))
    return path
