"""The training loop: data -> target features -> TTT loss -> AdamW -> checkpoints.

One loop for every feature source; online mode reads the target through forward hooks."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ..config import EAGLE31_FLAGS, Config
from ..data.sources import MemorySource, ShardSource
from ..data.template import ensure_chat_template
from ..files import write_text
from ..kernels.batch_invariant import batch_invariant
from ..log import say
from ..parallel.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..parallel.data import check_batch_size, dp_rows
from ..parallel.draft import backward, full_state_dict, replicated, replicated_head, reshard, shard_draft
from ..parallel.mesh import Dist, all_reduce_sum, barrier, init_distributed, is_main, shutdown
from ..prepare import load_samples, open_dump, vocab_for
from ..targets import (FeatureCapture, TargetHead, aux_layer_ids, config_sha256, decoder_parts, default_aux_layers,
                       document_mask, load_target, load_target_head, resolve_dtype, text_config)
from .checkpoint import load_draft, save_draft, step_folders
from .draft import Eagle3Draft, draft_config, init_draft_weights, param_count
from .layouts import LAYOUTS, SGLANG, SPECULATORS
from .ttt import StepStats, scored_index, soft_labels, step_weights, ttt_loss


def build_draft(cfg: Config, head: TargetHead, aux_ids: list[int], d2t, t2d,
                dist: Optional[Dist] = None) -> Eagle3Draft:
    embed = head.embed
    device = embed.weight.device
    if cfg.train.init_from:
        draft = init_draft(cfg, head, aux_ids)
    else:
        dcfg = draft_config(head.config, cfg.target.draft, embed.weight.shape[0], aux_ids)
        draft = Eagle3Draft(dcfg, embed)
        init_draft_weights(draft, seed=cfg.train.seed)
        draft.set_vocab(d2t, t2d)
        if cfg.train.init_head_from_target:
            with torch.no_grad():
                draft_ids = draft.target_ids().to(head.lm_head_weight.device)
                draft.lm_head.weight.copy_(head.lm_head_weight[draft_ids].float())
                draft.norm.weight.copy_(head.norm.weight.float())
        draft = draft.to(device, dtype=torch.float32)
    draft.checkpointing = cfg.train.grad_checkpoint
    if compiles_draft(cfg, device, dist):
        draft.compile_halves()
    return draft


def init_draft(cfg: Config, head: TargetHead, aux_ids: list[int]) -> Eagle3Draft:
    """train.init_from: a draft in either layout, ours or published, continued on this target. Its weights
    fix its shape, vocabulary and EAGLE 3.1 norms; the layers it reads must be those this run captures."""
    depth = text_config(head.config).num_hidden_layers
    draft = load_draft(cfg.train.init_from, head.embed, device=head.embed.weight.device, num_target_layers=depth)
    dcfg = draft.config
    if list(dcfg.eagle_aux_hidden_state_layer_ids) != list(aux_ids):
        raise SystemExit(f"train.init_from={cfg.train.init_from} reads the hidden states entering target layers "
                         f"{dcfg.eagle_aux_hidden_state_layer_ids} ({dcfg.ids_field}="
                         f"{dcfg.ids_as_written or 'none: the defaults'} in its config.json), but this run captures "
                         f"{list(aux_ids)}; set target.aux_layer_ids={dcfg.eagle_aux_hidden_state_layer_ids}")
    for flag in EAGLE31_FLAGS:
        if getattr(cfg.target.draft, flag) and not getattr(dcfg, flag):
            say(f"train: target.draft.{flag}=true ignored: the draft of train.init_from has no {flag}")
    return draft


def export_drafts(cfg: Config, draft: Eagle3Draft, weights: dict, out: Path, verifier: dict, extra: dict) -> Path:
    """The final draft in train.export_format: <out>/draft in that layout, or with `both` <out>/draft (SGLang)
    and <out>/draft-speculators (vLLM)."""
    fmt = cfg.train.export_format
    pairs = [(SGLANG, "draft"), (SPECULATORS, "draft-speculators")] if fmt == "both" else [(fmt, "draft")]
    for layout, name in pairs:
        save_draft(draft, out / name, getattr(torch, cfg.train.save_dtype), layout=layout, verifier=verifier,
                   state_dict=weights, extra=extra)
    flags = [f for f in EAGLE31_FLAGS if getattr(draft.config, f, False)]
    if flags and SGLANG in [layout for layout, _ in pairs]:
        # The draft is still correct to serve, but an engine that ignores the flags feeds it other inputs than
        # it was trained on, and its acceptance drops.
        say(f"train: the draft uses EAGLE 3.1's {' and '.join(flags)} (written to its config.json); serve it with "
            f"an engine that reads them (vLLM through the speculators layout, train.export_format=both), or check "
            f"that your SGLang does (upstream's LlamaForCausalLMEagle3 did not as of 2026-11)")
    return out / "draft"


def lr_lambda(cfg: Config, total_steps: int):
    warm, floor = cfg.train.warmup_steps, cfg.train.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class OnlineFeatures:
    """Features of a batch by running the target with hooks. `compile_layers`: each decoder layer's forward
    torch.compiled (`compile_layers_of`; train.compile_target), undone by `close`."""

    def __init__(self, target, layer_ids, compile_layers: bool = False):
        self.capture = FeatureCapture(target, layer_ids)
        self.compiled = compile_layers_of(target) if compile_layers else []

    def __call__(self, batch):
        if batch.doc_ids is None:
            # Rows are right-padded (collate): under causal attention no real token sees the padding, so no mask
            # is passed, and the target builds none and reads nothing on the host (`targets.unmasked_sdpa`).
            f = self.capture.run(batch.input_ids)
        else:  # packed: each conversation attends only to itself, positions from 0
            f = self.capture.run(batch.input_ids, document_mask(batch.doc_ids), batch.position_ids)
        return f.aux, f.final

    def close(self):
        self.capture.remove()
        for layer in self.compiled:
            del layer.forward  # the class's forward again
        self.compiled = []


def _compiles(given: Optional[bool], cfg: Config, device, parallel_ok: bool) -> bool:
    """A compile switch: as given, or where unset on a GPU, unless deterministic (torch.compile would replace the
    batch-invariant kernels) or `parallel_ok` is false."""
    if given is not None:
        return given
    return device.type == "cuda" and not cfg.train.deterministic and parallel_ok


def compiles_draft(cfg: Config, device, dist: Optional[Dist] = None) -> bool:
    """train.compile: by default in one process only. Under FSDP (several processes) the compiled halves with
    sharded parameters have not run on GPUs."""
    return _compiles(cfg.train.compile, cfg, device, dist is None or dist.world == 1)


def defers_reads(cfg: Config, device, dist: Optional[Dist] = None) -> bool:
    """train.defer_reads: by default on a GPU in one process. Several processes sum their statistics on the
    host at every step anyway, and found_inf with sharded parameters has not run."""
    one = dist is None or dist.world == 1
    if cfg.train.defer_reads is not None:
        if cfg.train.defer_reads and not one:
            raise SystemExit("train.defer_reads=true with several processes: not supported; leave it unset")
        return cfg.train.defer_reads
    return device.type == "cuda" and one


def clips_in_adamw(cfg: Config, device, dist: Optional[Dist] = None) -> bool:
    """train.clip_in_adamw: by default where AdamW is fused (a GPU, or deferred reads) and the weights are whole
    (one process), unless train.deterministic (whose bits stay those of clip_grad_norm_)."""
    fused = device.type == "cuda" or defers_reads(cfg, device, dist)  # as `_train` makes AdamW
    if cfg.train.clip_in_adamw is not None:
        if cfg.train.clip_in_adamw and not (dist is None or dist.world == 1):
            raise SystemExit("train.clip_in_adamw=true with several processes: not supported; leave it unset")
        if cfg.train.clip_in_adamw and not fused:
            raise SystemExit("train.clip_in_adamw=true needs fused AdamW: a GPU, or train.defer_reads=true")
        return cfg.train.clip_in_adamw
    return fused and (dist is None or dist.world == 1) and not cfg.train.deterministic


def clip_gradients(opt, params: list, max_norm: float, in_adamw: bool) -> torch.Tensor:
    """The gradients' global norm; the gradients scaled to norm `max_norm` where it is larger. `in_adamw`: by fused
    AdamW as it reads them (it divides them by `opt.grad_scale`), which saves clip_grad_norm_'s separate pass
    over them (a read and a write of 1.7 GB a step on the 8B shape); the same math, rounded apart (a division by
    the inverse factor instead of a multiplication). Else in place (clip_grad_norm_)."""
    if not in_adamw:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    opt.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)  # 1 / clip_grad_norm_'s factor
    return norm


def apply_update(opt, loss: torch.Tensor, grad_norm: torch.Tensor, defer: bool) -> torch.Tensor | bool:
    """AdamW's step unless the loss or the gradient is non-finite (then the weights stay those of the last good
    step); returns whether it was finite. Deferred: decided on the device through fused AdamW's found_inf
    (weights and moments untouched where it is 1), so nothing waits for the GPU; else read on the host, which
    waits for all queued work."""
    if defer:
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        opt.found_inf = (~finite).float()
        opt.step()
        return finite
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
    if finite:
        opt.step()
    return finite


@dataclass
class Launched:
    """A training step queued on the device whose host reads (`settle` in `_train`) are still to come.
    `finite` is a bool where the host decided at once, else a tensor on the device."""
    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    stats: list
    finite: torch.Tensor | bool
    tokens: int


# Drafts at least this wide (hidden size) sum their weight gradients in place by default: the 8B shape's step
# gains 2.5% (its matrices are 486 MB in bf16); the 135M shape's loses about 20% (its step waits on the host,
# and each summing matmul breaks the compiled halves). H100, docs/benchmarks.md, 2026-12-06.
SUM_WEIGHT_GRADS_MIN_WIDTH = 2048


def sums_weight_grads(cfg: Config, device, width: int) -> bool:
    """train.sum_weight_grads: by default on a GPU for drafts of hidden size `width` >= SUM_WEIGHT_GRADS_MIN_WIDTH,
    unless train.deterministic (whose bits stay those of autograd's sums)."""
    if cfg.train.sum_weight_grads is not None:
        return cfg.train.sum_weight_grads
    return device.type == "cuda" and not cfg.train.deterministic and width >= SUM_WEIGHT_GRADS_MIN_WIDTH


def compiles_target(cfg: Config, device, dist: Optional[Dist] = None) -> bool:
    """train.compile_target: by default unless tensor parallelism splits the target (its layers are not
    compiled)."""
    return _compiles(cfg.train.compile_target, cfg, device, dist is None or dist.tp == 1)


def compile_layers_of(target) -> list:
    """torch.compile each decoder layer's forward, as an instance attribute, so the pre-hooks that capture the
    features run outside the compiled code and `del layer.forward` undoes it. HF's eager layer runs its
    RMSNorms (float32 statistics), rope, SiLU and residual adds as separate kernels, a read and a write of the
    activations each; compiled, they fuse. The layers share one code object: the compiled code serves all of
    them (their weights are inputs, not constants)."""
    layers = list(decoder_parts(target)[1])
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return layers


FEATURE_CACHE_BYTES = 4 << 30  # train.cache_features=None keeps float32 features up to this size


def keeps_features(cfg: Config, device, dist: Optional[Dist], samples, hidden: int, steps_per_epoch: int) -> bool:
    """Whether online training computes the features once and keeps them (train.cache_features): where
    unset, when the run passes over its data more than once on the CPU, in one process, and they fit."""
    if cfg.train.cache_features is not None:
        return cfg.train.cache_features
    passes = (cfg.train.max_steps or steps_per_epoch * cfg.train.epochs) > steps_per_epoch
    nbytes = sum(len(s.input_ids) for s in samples) * 4 * hidden * 4  # aux (3H) + prenorm (H), float32
    return (passes and device.type == "cpu" and (dist is None or dist.world == 1)
            and nbytes <= FEATURE_CACHE_BYTES)


@torch.no_grad()
def capture_features(capture: FeatureCapture, samples, device) -> None:
    """Each sample's features from a forward of that sample alone (no padding and no neighbours, so the same
    values whenever they are computed: a resumed run reads what an unbroken one did), kept in the sample as
    a dump holds them (aux, and the final hidden state before the norm)."""
    for s in samples:
        f = capture.run(s.input_ids[None].to(device))
        s.aux, s.prenorm = f.aux[0], f.prenorm[0]


class OfflineFeatures:
    """Features of a batch read back from a dump; the target's final norm is applied here."""

    def __init__(self, norm):
        self.norm = norm

    def __call__(self, batch):
        with torch.no_grad():
            return batch.aux, self.norm(batch.prenorm)

    def close(self):
        pass


FLEX_PAD = 128  # flex attention's block size


def to_device(batch, cfg: Config, device):
    """The batch on `device` with its `Scored` index, made from its masks on the host. From the host to a GPU
    the copies go through pinned memory without waiting, so they queue behind the GPU's work instead of
    draining it, and nothing later in the step waits for the GPU to count positions (see `Scored`). A batch
    already on the GPU is read back to the host once for its masks."""
    def host(x):
        return None if x is None else x.cpu()

    index = scored_index(host(batch.loss_mask), host(batch.doc_ids), cfg.train.ttt_length)
    if device.type != "cuda":
        return batch.to(device), index.to(device)
    pinned = batch.map(lambda _, x: x if x.is_cuda else x.pin_memory())
    return pinned.to(device, non_blocking=True), index.map(torch.Tensor.pin_memory).to(device, non_blocking=True)


def run_batch(cfg: Config, draft, features, head: TargetHead, draft_ids, batch, device, mark=None,
              dist: Optional[Dist] = None):
    """Loss and per-step statistics of one batch (this rank's rows of it), on the host or on `device`
    already (`to_device` moves it). `mark()`, if given, is called between the target's part (features, soft
    labels) and the draft's (scripts/bench_train.py times the two apart). Under data parallelism each step's
    loss is divided by its count of scored positions over all dp ranks: the ranks' losses and gradients then
    add up to those of one process on the whole batch."""
    if device.type == "cuda" and cfg.train.attention != "reference":
        batch = batch.pad_to_multiple(FLEX_PAD)  # flex attention compiles per length: keep the lengths few
    batch, index = to_device(batch, cfg, device)
    aux, final = features(batch)
    # Labels only where the next token is trained on (the TTT loss never looks elsewhere).
    labels = soft_labels(final, head.lm_head_weight, draft_ids, index.needed)
    denominators = None
    if dist is not None and dist.dp > 1:
        denominators = all_reduce_sum(step_weights(batch.loss_mask, labels, draft.t2d, cfg.train.ttt_length,
                                                   cfg.train.mask_out_of_vocab, batch.doc_ids), dist.dp_group)
    if mark is not None:
        mark()
    autocast = device.type == "cuda" or (device.type == "cpu" and cfg.train.cpu_autocast)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        # Through the draft's forward, so that FSDP sees the step (see Eagle3Draft.forward).
        return draft(ttt_loss, batch.input_ids, batch.loss_mask, aux, labels, cfg.train.ttt_length,
                     cfg.train.step_weight, cfg.train.mask_out_of_vocab, fused=cfg.train.fused_loss,
                     loss_chunk=cfg.train.loss_chunk, loss_recompute=cfg.train.loss_recompute,
                     attention=cfg.train.attention, denominators=denominators, doc_ids=batch.doc_ids,
                     position_ids=batch.position_ids, tv_weight=cfg.train.tv_weight, index=index,
                     sum_weight_grads=sums_weight_grads(cfg, device, draft.config.hidden_size))


def global_stats(loss: torch.Tensor, stats: list, dist: Optional[Dist]):
    """A batch's loss and per-step statistics summed over the dp ranks (each rank's losses are its shares of
    the global means), for the log; a single process's as they are."""
    if dist is None or dist.dp == 1:
        return loss, stats
    flat = torch.stack([loss.double()] + [torch.as_tensor(v, device=loss.device).double()
                                          for s in stats for v in (s.loss, s.correct, s.accept, s.count)])
    flat = all_reduce_sum(flat, dist.dp_group).cpu()
    per = flat[1:].view(len(stats), 4)
    return flat[0].to(loss.dtype), [StepStats(r[0].float(), r[1].long(), r[2].float(), r[3].long()) for r in per]


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
def evaluate(cfg, draft, features, head, draft_ids, source, device, dist: Optional[Dist] = None) -> dict:
    draft.eval()
    stats = []
    for b in source.eval_batches():
        loss, st = run_batch(cfg, draft, features, head, draft_ids, dp_rows(b, dist), device, dist=dist)
        stats.append(global_stats(loss, st, dist)[1])
    reshard(draft)
    draft.train()
    return summarize(stats) if stats else {}


def online_setup(cfg: Config, device, dist: Optional[Dist] = None):
    """The target in memory; features come from hooks on it. With parallel.tp_size > 1 each rank holds its
    slices of the target, and its features come out whole on every rank of the tp group."""
    if dist is not None and dist.tp > 1:
        from ..parallel.tensor_parallel import load_target_tp

        if cfg.train.compile_target is True:
            raise SystemExit("train.compile_target with parallel.tp_size > 1: the split target's layers are not "
                             "compiled (untested with DTensor weights); set train.compile_target=false")

        target, tok = load_target_tp(cfg.target, dist.tp_mesh, device, resolve_dtype(cfg.target.dtype, device))
    else:
        target, tok = load_target(cfg.target, device)
    ensure_chat_template(tok, cfg.data.chat_template)
    train_samples, eval_samples = load_samples(cfg, target, tok, dist)
    head = TargetHead.from_model(target)
    if dist is not None and dist.tp > 1:
        head = replicated_head(head)  # the lm_head and embedding the draft reads, gathered once
    ids = aux_layer_ids(cfg.target, target)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    source = MemorySource(train_samples, eval_samples, cfg.train.batch_size, cfg.train.seed, pad_id,
                          cfg.data.max_length if cfg.train.pack else None)
    features = OnlineFeatures(target, ids, compiles_target(cfg, device, dist))
    samples = train_samples + eval_samples
    if keeps_features(cfg, device, dist, samples, text_config(target.config).hidden_size,
                      source.steps_per_epoch()):
        start = time.perf_counter()
        capture_features(features.capture, samples, device)
        features.close()
        features = OfflineFeatures(head.norm)
        if is_main(dist):
            print(f"train: target features of {len(samples)} samples computed once and kept "
                  f"({time.perf_counter() - start:.0f} s; train.cache_features)", flush=True)
    return head, ids, features, source, train_samples


def offline_setup(cfg: Config, device, dist: Optional[Dist] = None):
    """Features from a dump; of the target only the embedding, final norm and lm_head are loaded (whole on
    every rank: parallel.tp_size has nothing to split here)."""
    folder, manifest = open_dump(cfg)
    head = load_target_head(cfg.target, device)
    ident = manifest.identity
    want_ids = list(cfg.target.aux_layer_ids) if cfg.target.aux_layer_ids else default_aux_layers(
        text_config(head.config).num_hidden_layers)
    if ident.target_config_sha256 != config_sha256(head.config) or ident.aux_layer_ids != want_ids:
        raise SystemExit(f"{folder} was dumped from target {ident.target!r} (layers {ident.aux_layer_ids}); "
                         f"this run trains for {cfg.target.name!r} (layers {want_ids}): refusing to mix them")
    source = ShardSource(cfg, folder, manifest, cfg.train.shuffle_window, pad_id=0)
    vocab_samples = [s for shard in source.train_tokens() for s in shard]
    return head, ident.aux_layer_ids, OfflineFeatures(head.norm), source, vocab_samples


def set_deterministic(on: bool) -> None:
    """Deterministic kernels on the GPU (cuBLAS workspace, deterministic index_put/scatter backward); the
    CPU path is deterministic already. Must run before the first CUDA matmul to cover cuBLAS."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False


def resume_folder(cfg: Config, out: Path, verbose: bool = True) -> Optional[Path]:
    if not cfg.train.resume:
        return None
    if cfg.train.resume != "latest":
        return Path(cfg.train.resume)
    found = step_folders(out / "checkpoints")
    if not found and verbose:
        print(f"train: nothing to resume under {out / 'checkpoints'}; starting from step 0", flush=True)
    return found[-1] if found else None


def train(cfg: Config) -> Path:
    """Train a draft; returns the folder of the final checkpoint (serving format). Launched on several
    processes (`--nproc N`, torchrun), every process runs this same loop on the same global batches and
    takes its rows of each (see specforge/parallel); rank 0 alone logs and writes."""
    if cfg.train.mode not in ("online", "offline"):
        raise SystemExit(f"train.mode={cfg.train.mode!r}: choose online or offline")
    if cfg.train.export_format not in (*LAYOUTS, "both"):
        raise SystemExit(f"train.export_format={cfg.train.export_format!r}: choose {', '.join(LAYOUTS)} or both")
    for key in ("compile", "compile_target"):
        if cfg.train.deterministic and getattr(cfg.train, key):
            raise SystemExit(f"train.deterministic and train.{key}: torch.compile would replace the "
                             "batch-invariant kernels with its own; set one of them to false")
    with batch_invariant(cfg.train.deterministic, training=True):
        return _train(cfg)


def _train(cfg: Config) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    set_deterministic(cfg.train.deterministic)
    t_begin = time.perf_counter()  # the stages are timed: a GPU lease is short, and this says where it went
    dist = init_distributed(cfg)
    device, main = dist.device, is_main(dist)
    check_batch_size(cfg.train.batch_size, dist)
    torch.manual_seed(cfg.train.seed)
    out = cfg.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    setup = online_setup if cfg.train.mode == "online" else offline_setup
    head, ids, features, source, vocab_samples = setup(cfg, device, dist)
    vocab_size = head.embed.weight.shape[0]
    d2t, t2d = vocab_for(cfg, vocab_samples, vocab_size, min(cfg.target.draft.draft_vocab_size, vocab_size), dist)
    draft = shard_draft(build_draft(cfg, head, ids, d2t, t2d, dist), dist)
    draft_ids = draft.target_ids()

    total = cfg.train.max_steps or source.steps_per_epoch() * cfg.train.epochs
    params = [p for p in draft.parameters() if p.requires_grad]
    defer = defers_reads(cfg, device, dist)
    clip_in_adamw = clips_in_adamw(cfg, device, dist)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay, fused=device.type == "cuda" or defer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    # Where the run stands: everything a resumed run needs to continue bitwise where this one stopped.
    pos = {"step": 0, "epoch": 0, "batch": 0, "losses": [], "nonfinite": 0}
    start = resume_folder(cfg, out, main)
    if start is not None:
        state = load_checkpoint(dist, draft, opt, start, total)
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], dist)
        pos = state["position"]
        if main:
            print(f"train: resumed from {start} at step {pos['step']} (epoch {pos['epoch']}, "
                  f"batch {pos['batch']})", flush=True)
    ckpt_dir = out / "checkpoints"

    def checkpoint() -> Path:
        shared = {"scheduler": sched.state_dict(), "position": pos, "total_steps": total, "config": asdict(cfg)}
        return save_checkpoint(dist, draft, opt, ckpt_dir / f"step_{pos['step']:07d}",
                               getattr(torch, cfg.train.save_dtype), shared, {"rng": rng_state(dist)},
                               cfg.train.keep_checkpoints)

    writer = SummaryWriter(str(out / "tb"), purge_step=pos["step"] if start is not None else None) if main \
        else _NoWriter()
    if main:
        write_json(out / "config.json", asdict(cfg))
        print(f"train ({cfg.train.mode}): target {cfg.target.name} on {device}"
              f"{f' x {dist.world} (dp={dist.dp}, tp={dist.tp})' if dist.world > 1 else ''}, draft "
              f"{param_count(draft) / 1e6:.1f}M params, {total} steps", flush=True)
    stop = min(total, cfg.train.stop_after or total)

    t_steps = time.perf_counter()
    bar = tqdm(total=total, initial=pos["step"], desc="train", unit="step", **({} if main else {"disable": True}))
    t_last, tokens_since, bad_run = time.perf_counter(), 0, 0
    halt = None  # (non-finite steps in a row, step) once there are train.max_nonfinite of them

    def launch(batch) -> Launched:
        """Forward, backward, clip and update of one batch, queued. With `defer`, nothing here waits for the
        GPU: a non-finite step's update is skipped by the optimizer on the device; else the host decides."""
        tokens = batch.num_tokens
        batch = dp_rows(batch, dist)  # run_batch moves it to the device
        loss, stats = run_batch(cfg, draft, features, head, draft_ids, batch, device, dist=dist)
        backward(loss, dist)
        grad_norm = replicated(clip_gradients(opt, params, cfg.train.grad_clip, clip_in_adamw))  # global norm
        loss, stats = global_stats(loss.detach(), stats, dist)  # the same on every rank
        finite = apply_update(opt, loss, grad_norm, defer)
        with warnings.catch_warnings():  # a skipped update still uses up its step of the schedule
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
            sched.step()
        opt.zero_grad(set_to_none=True)
        pos["step"] += 1
        pos["batch"] += 1
        return Launched(pos["step"], loss, grad_norm, stats, finite, tokens)

    def settle(s: Launched) -> None:
        """A launched step's host reads: its loss into the record, the non-finite count, the log."""
        nonlocal t_last, tokens_since, bad_run, halt
        finite = bool(s.finite)
        tokens_since += s.tokens
        pos["losses"].append(s.loss.item())
        if finite:
            bad_run = 0
        else:
            pos["nonfinite"] += 1
            bad_run += 1
            writer.add_scalar("train/nonfinite_steps", pos["nonfinite"], s.step)
            if main:
                tqdm.write(f"train: step {s.step}: non-finite loss or gradient ({s.loss.item()}, grad "
                           f"norm {float(s.grad_norm)}); update skipped ({pos['nonfinite']} so far)")
            if bad_run >= cfg.train.max_nonfinite and halt is None:
                halt = (bad_run, s.step)
        if finite and (s.step % cfg.train.log_every == 0 or s.step == total):
            now = time.perf_counter()
            tps = tokens_since / (now - t_last)
            t_last, tokens_since = now, 0
            m = summarize([s.stats])
            writer.add_scalar("train/loss", s.loss.item(), s.step)
            for k in range(cfg.train.ttt_length):
                writer.add_scalar(f"train/loss_{k}", m[f"loss_{k}"], s.step)
                writer.add_scalar(f"train/acc_{k}", m[f"acc_{k}"], s.step)
                writer.add_scalar(f"train/accept_{k}", m[f"accept_{k}"], s.step)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], s.step)
            writer.add_scalar("train/grad_norm", float(s.grad_norm), s.step)
            writer.add_scalar("train/tokens_per_s", tps, s.step)
            bar.set_postfix(loss=f"{s.loss.item():.3f}", acc0=f"{m['acc_0']:.2f}", tok_s=f"{tps:.0f}")
        bar.update(1)

    pending = None  # with `defer`: the step launched last, settled after the next one is queued
    while pos["step"] < stop:
        for batch in source.train_batches(pos["epoch"], skip=pos["batch"]):
            launched = launch(batch)
            if pending is not None:
                settle(pending)
            pending = launched
            step = pos["step"]
            evals = bool(cfg.train.eval_interval and step % cfg.train.eval_interval == 0)
            saves = bool(cfg.train.save_interval and step % cfg.train.save_interval == 0) or step == stop < total
            if not defer or evals or saves or step >= stop or halt is not None:
                settle(pending)  # what follows reads the record up to this step
                pending = None
            if halt is not None:
                folder = checkpoint()
                raise SystemExit(f"train: {halt[0]} non-finite steps in a row (up to step {halt[1]}); stopping. "
                                 f"The last good weights are in {folder}. Lower train.lr, or look for bad data "
                                 f"or features; `--resume` continues from there.")
            if evals:
                _log_eval(writer, evaluate(cfg, draft, features, head, draft_ids, source, device, dist), step)
            if saves:
                checkpoint()
            if step >= stop:
                break
        else:
            pos["epoch"] += 1
            pos["batch"] = 0
    bar.close()
    t_loop = time.perf_counter()
    if pos["step"] < total:
        writer.close()
        features.close()
        if main:
            print(f"train: stopped at step {pos['step']} of {total} (train.stop_after); continue with --resume",
                  flush=True)
        shutdown(dist)
        return step_folders(ckpt_dir)[-1]
    metrics = {"steps": pos["step"], "train_losses": pos["losses"], "nonfinite_steps": pos["nonfinite"],
               "eval": evaluate(cfg, draft, features, head, draft_ids, source, device, dist)}
    t_eval = time.perf_counter()
    _log_eval(writer, metrics["eval"], pos["step"])
    writer.close()
    features.close()
    final = out / "draft"
    weights = full_state_dict(draft, dist)  # every rank takes part in gathering it
    if main:
        verifier = {"name_or_path": cfg.target.hub_id or cfg.target.path or cfg.target.name,
                    "architectures": getattr(head.config, "architectures", None)}
        export_drafts(cfg, draft, weights, out, verifier,
                      extra={"target": cfg.target.name, "steps": pos["step"], "mode": cfg.train.mode})
        seconds = {"setup": t_steps - t_begin, "steps": t_loop - t_steps, "eval": t_eval - t_loop,
                   "export": time.perf_counter() - t_eval}
        metrics["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        write_json(out / "metrics.json", metrics)
        ev = metrics["eval"]
        if ev:
            accs = " ".join(f"{ev[f'acc_{k}']:.3f}" for k in range(cfg.train.ttt_length))
            print(f"eval (held-out): acc_0..{cfg.train.ttt_length - 1} = {accs}; "
                  f"chain acceptance-length estimate (5 steps) = {ev['chain_accept_len_5']:.2f}", flush=True)
        if pos["nonfinite"]:
            print(f"train: {pos['nonfinite']} steps had a non-finite loss or gradient and were skipped", flush=True)
        both = cfg.train.export_format == "both"
        also = f" and, in the speculators layout, {out / 'draft-speculators'}" if both else ""
        print(f"train: draft written to {final}{also}", flush=True)
        print(f"train: {seconds['setup']:.0f} s before the first step (target, data, draft vocab, resume), "
              f"{seconds['steps']:.0f} s of steps, {seconds['eval']:.0f} s held-out eval, "
              f"{seconds['export']:.0f} s export", flush=True)
    barrier(dist)
    shutdown(dist)
    return final


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))


class _NoWriter:
    """The TensorBoard writer of ranks other than 0."""

    def add_scalar(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _log_eval(writer, m: dict, step: int):
    for key, value in m.items():
        writer.add_scalar(f"eval/{key}", value, step)
