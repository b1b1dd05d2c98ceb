"""Our EAGLE-3 training step against upstream SpecForge's, on the same inputs, one device, one run each.

    python scripts/compare_upstream.py --upstream upstream/SpecForge --shape llama3.1-8b --seq 2048 --batch 1
    python scripts/compare_upstream.py --upstream upstream/SpecForge --shape tiny --steps 4 --warmup 1   # CPU check

    # acceptance (issue 18 item 2): both drafts trained on the same target features, held-out acc_0..6
    python -m specforge prepare-data --target smollm2-135m out_dir=outputs/cmp prepare.synthesize=3000
    python scripts/compare_upstream.py --upstream upstream/SpecForge --target smollm2-135m \
        --data outputs/cmp/prepared.jsonl --features outputs/cmp/features.pt --out outputs/cmp/acceptance.json
    # the same at a size whose features would not fit on disk: each side runs the target per batch
    python scripts/compare_upstream.py --upstream upstream/SpecForge --target smollm2-135m --online \
        --data outputs/smollm2-gpu/prepared.jsonl --features outputs/cmp/tokens.pt --out outputs/cmp/acceptance.json
    # the two sides at once on one GPU (acceptance does not mind sharing it; tokens/s then do not compare):
    # write the batches and run ours, start upstream's once the file is there, then one table
    python scripts/compare_upstream.py ... --data D --features F --only ours --out ours.json &
    until [ -f F ]; do sleep 5; done
    python scripts/compare_upstream.py --upstream upstream/SpecForge --features F --only upstream --out up.json
    wait; python scripts/compare_upstream.py --merge ours.json up.json

Acceptance mode (`--features FILE`). With `--data` (the JSONL `specforge prepare-data` writes) the parent first
writes FILE with our code only: the conversations read, tokenised and split as `specforge train` does
(`load_samples`, every `--eval-every`-th held out, data.max_length = `--seq` or the config's), the draft vocab
(d2t/t2d) built from the training split (`count_tokens`, `build_vocab`), then the target (`--target`: a
configs/targets name or an HF folder; `load_target`) run once over fixed batches of `--batch` rows (the
config's train.batch_size by default; length-bucketed as `epoch_batches` makes them; padded to a multiple of
128 on CUDA) with our hooks (`FeatureCapture`): token ids, attention and loss masks, aux features [B, T, 3H] and
the final normed hidden state [B, T, H], in bf16, plus the target's embedding, lm_head and final norm. Without
`--data` FILE is reused. With `--online` FILE holds the token batches and masks only, and each side loads the
target itself and runs it over each batch as it trains (`online_featurizer`: the same load, hooks and forward
on both sides, held to `FeatureCapture` by the tests): the features of the recipe's 82K conversations would
take about 110 GB, more than the GPU machine's disk. Each side (own process, FILE memory-mapped) then trains
its draft for `--epochs`
(default the config's train.epochs) over the train batches, the batch order of each epoch drawn from `--seed`
(`batch_order`, the same on both sides), at a constant `--lr` (default the config's train.lr) with gradient
clip `--clip` (0.5), and evaluates the held-out batches with its own forward:
  ours      `build_draft`, `run_batch` (as `specforge train`, with warmup 0 and min_lr_ratio 1: a constant lr),
            clip_grad_norm_, AdamW; held-out acc_k from `specforge.eagle3.train.evaluate` (our eval).
            `--ours KEY=VALUE` overrides apply here (and to the parent, e.g. target.draft.draft_vocab_size).
  upstream  the same draft, model, strategy and BF16Optimizer as the speed mode; held-out: its
            `Eagle3TrainStrategy.forward_loss` under no_grad, the draft logits of every TTT step taken where its
            forward computes them (`draft.compute_logits`) and scored by this harness with our definition
            (`acc_from_logits`). Upstream's own acc (its `acc_corrects / acc_denoms`: draft top-1 == target
            argmax, OOV a miss, like ours, but over its loss mask shifted by k, i.e. position t scored when
            token t+k is trained on where the predicted token is t+2+k) is reported beside it
            (`upstream_own_acc`), not used.
The chain acceptance-length estimate is computed from acc_0..4 by our `summarize` (1 + sum of running
products). Printed: side, epochs, steps, final train loss (mean of the last 20 steps, each side's own
normalisation), held-out acc_0..6, the chain estimate, training tokens/s (real tokens, features read from
FILE included). Differences left between the sides: those of the speed mode below (loss normalisation and
the upstream loss mask shift, precision, AdamW betas (0.9, 0.95) ours vs (0.9, 0.999) upstream, weight decay 0
both), and initialisation: ours follows its config, whose train.init_head_from_target=true starts our
draft's lm_head and norm from the target's (upstream starts them random); `--ours
train.init_head_from_target=false` removes that difference.

What it measures. Each side runs in its own subprocess (`--side ours|upstream`, internal). Both get the same
inputs, drawn on the device from `--seed` by this file alone (torch only): a target shape (`--shape`, from
`specforge.model_shapes` and `configs/targets`; `tiny` for the CPU), the target's token embedding and lm_head
(random weights; the draft-vocab rows of the lm_head drawn twice as wide so the target's argmax mostly lands in
the draft vocab, as it does with a vocab built from data), the draft vocab (d2t/t2d), one batch of random
tokens whose last 15/16 are trained on, random aux features [B, T, 3H] and the target's final (normed) hidden
state [B, T, H], made from the token's embedding plus the last aux feature so the labels are learnable. Each
side computes its own soft labels from those hidden states with the lm_head, runs `--ttt` (7) TTT steps, its
loss, backward and optimizer step, `--warmup` untimed steps then `--steps` timed ones, on that same batch.

  ours      `specforge.eagle3.train.build_draft` and `run_batch` (what `specforge train` and
            `scripts/bench_train.py` run: soft labels, TTT unroll with `train.attention`, fused loss), then
            clip_grad_norm_ and AdamW (fused on CUDA), fp32 weights under bf16 autocast on CUDA.
            `--ours KEY=VALUE ...` adds config overrides (e.g. train.compile=true).
  upstream  its draft `LlamaForCausalLMEagle3` (specforge/modeling/draft/llama3_eagle.py) built through
            `AutoDraftModel.from_config` with a config equal to ours, wrapped in `OnlineEagle3Model`
            (specforge/algorithms/eagle3/model.py), trained through `Eagle3TrainStrategy.forward_loss`
            (specforge/training/strategies/base.py) with its `TargetHead` (specforge/modeling/target/
            target_head.py), then `loss.backward()` and its `BF16Optimizer.step()` (specforge/optimizer.py):
            bf16 weights, fp32 master copies, grad clip 0.5. Its attention backend is `flex_attention` on
            CUDA (its default) and `sdpa` on the CPU (torch's FlexAttention has no backward on the CPU).
            Upstream's online mode reads target features from an SGLang server only (its in-process HF target
            backend is gone at a6b6b02), so the step runs as its offline path does (`target_repr=
            "hidden_state"`: its TargetHead turns the final hidden state into logits inside the step), which is
            also what our online step does (the lm_head runs inside `run_batch`).

Printed (and written as JSON with `--out`): tokens/s, ms per step split into labels (target lm_head + soft
labels), draft forward + loss (the TTT unroll), backward and optimizer (CUDA events on a GPU, perf_counter on
the CPU), peak memory (torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on the CPU; on a GPU
also per phase: its peak and what is allocated at its end, so the memory held from the forward to the backward
shows), the trainable parameter count, and the loss of every step (each side's own normalisation; see below),
which should fall.

On the GPU machine. The upstream side imports only specforge/{utils,distributed,optimizer,lr_scheduler}.py,
specforge/algorithms (registry, contracts, eagle3), specforge/core, specforge/modeling and specforge/runtime/
contracts.py, specforge/training/strategies/base.py: no sglang, yunchang, wandb, datasets, pydantic. It needs
nothing beyond what our own training needs: torch (with the triton its CUDA wheel depends on; upstream's loss
is a Triton kernel), transformers, huggingface-hub (a transformers dependency; imported by upstream's draft
base class), safetensors, accelerate. Upstream pins torch==2.11.0 and transformers==5.8.1 (pyproject.toml);
by default both sides run in the one environment (the same torch, so the same compiler and kernels);
`--upstream-python PY` runs the upstream side under another interpreter, e.g. a venv with upstream's pins:
    pip install torch==2.11.0 transformers==5.8.1 accelerate safetensors huggingface-hub
sglang==0.5.14, yunchang, wandb, openai-harmony, datasets, tensorboard and pydantic are not imported.
Export the upstream tree with
    mkdir -p upstream/SpecForge && git --git-dir=<SpecForge mirror> archive HEAD | tar -x -C upstream/SpecForge

On the CPU, upstream's `specforge/core/loss.py` cannot be imported as it is: it imports triton at the top to
define its Triton kernels, and the CPU torch has no triton. There (only there) this script puts a stand-in
`triton` module in sys.modules for the duration of that one import (torch's own triton probing is done before,
and the stand-in is removed after), and replaces `LogSoftmaxLoss` in upstream's eagle3 model module by
upstream's own reference `_compute_loss` of the same file (the same sum over draft vocab and mean over B*T
positions), since a Triton kernel cannot run on CPU tensors. On CUDA nothing is stubbed or replaced.

Differences between the two steps that a reader of the figures should keep in mind (upstream line numbers at
a6b6b02):
  * loss normalisation: upstream divides each TTT step's summed cross-entropy by B*T, all positions
    (core/loss.py:201, backward scale 1/(B*T) at :207); ours by the number of positions that step scores
    (eagle3/ttt.py). Its loss values (and gradients) are smaller by that fraction; only the trend compares.
  * loss mask: upstream shifts the input ids and the target's hidden state by one (modeling/target/
    target_head.py:103-108) but not the loss mask, so position t at step k is scored when token t+k is an
    assistant token (algorithms/eagle3/model.py:493, :430-432); ours when token t+2+k is (the token
    predicted). Both also drop positions whose target argmax is outside the draft vocab.
  * precision: upstream trains bf16 weights with fp32 masters in a non-fused AdamW with torch's default betas
    (0.9, 0.999) (optimizer.py:12-45; model built in bf16: config/schema.py:73, algorithms/model_providers.py:112,
    :271), logits of every position in bf16; ours fp32 weights, bf16 autocast, fused AdamW with betas
    (0.9, 0.95), logits only of scored positions, chunked. Both: the same lr (`--lr`, constant), clip 0.5.
  * labels: upstream materialises full-vocab logits [B, T, V] in bf16 (target_head.py:100-101) and an fp32 copy
    (algorithms/eagle3/model.py:487-501, torch.compile'd) for every position; ours only at scored positions,
    1024 rows at a time (eagle3/ttt.py soft_labels). `--upstream-compact-teacher` uses upstream's offline
    compact teacher (core/compact_teacher.py) instead.
  * attention: upstream's flex mask shrinks the valid length by one per TTT step (llama3_eagle.py:859-862,
    flex_attention.py:108-127), grows a DynamicCache by T keys per step and builds a block mask every step
    (llama3_eagle.py:852-891); on the CPU its sdpa backend materialises [B, heads, T, T] scores plus the
    repeated kv heads (llama3_eagle.py:717-785). Positions and the TTT schedule are the same (rope position
    t+k at step k, the raw layer output carried to the next step, step weights 0.8^k: strategies/base.py:291).
  * upstream calls torch.cuda.empty_cache() in every forward (algorithms/eagle3/model.py:307); counted.
  * not measured on upstream's side: its trainer's FSDP/DDP wrapper (training/backend.py:208-281) and per-step
    metric reductions (training/controller.py:331-365); this harness calls the strategy and optimizer directly.
  * initialisation: ours starts its lm_head and norm from random, like upstream (train.init_head_from_target is
    set false here); both draw N(0, 0.02) weights, from different generators.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A shape small enough for the CPU (a Llama-family target of 4 layers).
TINY = {"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "vocab_size": 2048, "draft_vocab_size": 512, "num_hidden_layers": 4, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "aux_layer_ids": [1, 2, 3]}


# ---------------------------------------------------------------------------------------------- the spec
def resolve_spec(args) -> dict:
    """The draft shape both sides build, from our own config code (the parent process only)."""
    import torch
    from transformers import LlamaConfig

    from specforge.config import DraftConfig, load_config, preset_names
    from specforge.eagle3.draft import draft_config
    from specforge.targets import default_aux_layers

    preset = None
    if args.shape == "tiny":
        t = dict(TINY)
        aux = t.pop("aux_layer_ids")
        dv = t.pop("draft_vocab_size")
        tcfg = LlamaConfig(**t)
        dcfg = draft_config(tcfg, DraftConfig(draft_vocab_size=dv), tcfg.vocab_size, aux)
    else:
        from specforge.model_shapes import SHAPES, shape_config

        if args.shape not in SHAPES:
            raise SystemExit(f"--shape {args.shape}: one of tiny, {', '.join(SHAPES)}")
        tcfg = shape_config(args.shape)
        preset = args.shape if args.shape in preset_names() else None
        cfg = load_config(preset)
        aux = list(cfg.target.aux_layer_ids or default_aux_layers(tcfg.num_hidden_layers))
        dcfg = draft_config(tcfg, cfg.target.draft, tcfg.vocab_size, aux)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    seq = args.seq or (2048 if device == "cuda" else 128)
    return {
        "shape": args.shape, "preset": preset, "device": device,
        "hidden_size": dcfg.hidden_size, "intermediate_size": dcfg.intermediate_size,
        "num_attention_heads": dcfg.num_attention_heads, "num_key_value_heads": dcfg.num_key_value_heads,
        "head_dim": dcfg.head_dim, "vocab_size": dcfg.vocab_size, "draft_vocab_size": dcfg.draft_vocab_size,
        "rms_norm_eps": dcfg.rms_norm_eps, "max_position_embeddings": dcfg.max_position_embeddings,
        "rope_parameters": dict(dcfg.rope_parameters), "num_target_layers": dcfg.num_target_layers,
        "aux_layer_ids": aux, "seq": seq, "batch": args.batch, "ttt": args.ttt, "steps": args.steps,
        "warmup": args.warmup, "lr": args.lr, "seed": args.seed,
    }


# -------------------------------------------------------------------------------------- shared inputs
def make_inputs(spec: dict):
    """The same tensors in both processes: drawn in a fixed order from one generator on the device."""
    import torch

    dev = torch.device(spec["device"])
    g = torch.Generator(device=dev).manual_seed(spec["seed"])
    v, vd, h = spec["vocab_size"], spec["draft_vocab_size"], spec["hidden_size"]
    b, t = spec["batch"], spec["seq"]
    bf16 = torch.bfloat16

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).mul_(std)

    embed = normal(v, h, std=0.02)
    lm_head = normal(v, h, std=0.02)
    t2d = torch.zeros(v, dtype=torch.bool, device=dev)
    t2d[torch.randperm(v, generator=g, device=dev)[:vd]] = True
    lm_head[t2d] *= 2.0  # the target's argmax then mostly lands in the draft vocab
    d2t = t2d.nonzero().flatten() - torch.arange(vd, device=dev)
    input_ids = torch.randint(0, v, (b, t), generator=g, device=dev)
    aux = normal(b, t, 3 * h)
    x = embed[input_ids] / 0.02 + aux[..., 2 * h:]
    final = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec["rms_norm_eps"])  # the final norm (unit weight)
    loss_mask = torch.zeros(b, t, dtype=torch.bool, device=dev)
    loss_mask[:, t // 16:] = True  # a prompt, then the answer the draft learns
    return {"embed": embed.to(bf16), "lm_head": lm_head.to(bf16), "t2d": t2d, "d2t": d2t, "input_ids": input_ids,
                "attention_mask": torch.ones(b, t, dtype=torch.long, device=dev), "loss_mask": loss_mask,
                "aux": aux.to(bf16), "final": final.to(bf16)}


# -------------------------------------------------------------------------------------------- timing
class Clock:
    """Marks within a step: CUDA events on a GPU, perf_counter on the CPU (where ops run synchronously). On a GPU
    each mark also notes the memory allocated then and the peak since the previous mark (which it resets), so a
    step's peak can be placed in a phase and the memory held from forward to backward read off."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def start(self):
        self.marks, self.mem = [], []
        self.mark()

    def mark(self, *_):
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
            cuda = self.torch.cuda
            self.mem.append((cuda.memory_allocated() / 2**30, cuda.max_memory_allocated() / 2**30))
            cuda.reset_peak_memory_stats()
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks (waits for the last one)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


PHASES = ("labels", "draft_fwd", "backward", "optimizer")


def timed_loop(spec, device, step_fn) -> dict:
    """Runs warmup + steps; step_fn(clock) must call clock.mark() after labels, draft forward+loss, backward
    and optimizer (4 marks) and return (total loss, step-0 loss) tensors."""
    import torch

    clock = Clock(device)
    spent = dict.fromkeys(PHASES, 0.0)
    losses, first = [], []
    peaks, held = [0.0] * len(PHASES), [0.0] * len(PHASES)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, spent = time.perf_counter(), dict.fromkeys(PHASES, 0.0)
        clock.start()
        loss, loss0 = step_fn(clock)
        for p, s in zip(PHASES, clock.intervals()):
            spent[p] += s
        if clock.mem:  # GPU: per phase, the peak (over all steps) and what is allocated at its end (this step)
            peaks = [max(a, b) for a, (_, b) in zip(peaks, clock.mem[1:])]
            held = [a for a, _ in clock.mem[1:]]
        losses.append(loss.detach().float())
        first.append(loss0.detach().float())
        print(f"  step {i + 1}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    n = spec["steps"]
    tokens = n * spec["batch"] * spec["seq"]
    out = {"tokens_per_s": tokens / elapsed, "step_ms": 1e3 * elapsed / n,
           "phase_ms": {p: 1e3 * spent[p] / n for p in PHASES},
           "losses": [float(x) for x in losses], "step0_losses": [float(x) for x in first]}
    if device.type == "cuda":
        out["peak_mem_gib"] = max(peaks + [torch.cuda.max_memory_allocated() / 2**30])
        out["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
        out["phase_peak_gib"], out["phase_end_gib"] = dict(zip(PHASES, peaks)), dict(zip(PHASES, held))
    else:
        import resource

        out["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
        out["peak_mem_kind"] = "peak RSS of the whole process (CPU)"
    return out


def versions() -> dict:
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------ our side
def run_ours(spec: dict, args) -> dict:
    import torch
    from torch import nn
    from transformers import LlamaConfig

    import specforge
    from specforge.config import load_config
    from specforge.data.batching import Batch
    from specforge.eagle3.train import build_draft, run_batch, set_deterministic
    from specforge.kernels.batch_invariant import batch_invariant
    from specforge.layers import RMSNorm
    from specforge.targets import TargetHead

    src = Path(specforge.__file__).resolve().parent
    if src != REPO / "specforge":
        raise RuntimeError(f"our side imported specforge from {src}, not {REPO / 'specforge'}")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as bench_train: a deterministic variant can run
    dev = torch.device(spec["device"])
    overrides = [f"device={dev.type}", f"train.batch_size={spec['batch']}", f"data.max_length={spec['seq']}",
                 f"train.ttt_length={spec['ttt']}", f"train.seed={spec['seed']}", "train.init_head_from_target=false",
                 f"target.draft.intermediate_size={spec['intermediate_size']}",
                 f"target.draft.num_attention_heads={spec['num_attention_heads']}",
                 f"target.draft.num_key_value_heads={spec['num_key_value_heads']}",
                 f"target.draft.head_dim={spec['head_dim']}",
                 f"target.draft.draft_vocab_size={spec['draft_vocab_size']}", *args.ours]
    cfg = load_config(spec["preset"], overrides=overrides)
    inp = make_inputs(spec)
    tcfg = LlamaConfig(hidden_size=spec["hidden_size"], num_attention_heads=spec["num_attention_heads"],
                       num_key_value_heads=spec["num_key_value_heads"], head_dim=spec["head_dim"],
                       intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_target_layers"],
                       vocab_size=spec["vocab_size"], rms_norm_eps=spec["rms_norm_eps"],
                       max_position_embeddings=spec["max_position_embeddings"],
                       rope_parameters=spec["rope_parameters"])
    embed = nn.Embedding.from_pretrained(inp["embed"], freeze=True)
    norm = RMSNorm(spec["hidden_size"], spec["rms_norm_eps"]).to(dev)  # unused: the features come normed
    head = TargetHead(tcfg, embed, norm, inp["lm_head"])
    with batch_invariant(cfg.train.deterministic, training=True):
        set_deterministic(cfg.train.deterministic)
        t2d = inp["t2d"]
        draft = build_draft(cfg, head, spec["aux_layer_ids"], inp["d2t"], t2d)
        dc = draft.config
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "vocab_size", "draft_vocab_size"):
            if getattr(dc, key) != spec[key]:
                raise RuntimeError(f"our draft has {key}={getattr(dc, key)}, the spec {spec[key]}")
        draft_ids = draft.target_ids().to(dev)

        def features(batch):  # the target's features, as the hooks would give them (padded like the batch)
            extra = batch.input_ids.shape[1] - inp["aux"].shape[1]
            pad = (lambda x: torch.cat([x, x.new_zeros(x.shape[0], extra, x.shape[2])], 1)) if extra else (lambda x: x)
            return pad(inp["aux"]), pad(inp["final"])

        params = [p for p in draft.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=spec["lr"], betas=tuple(cfg.train.betas),
                                weight_decay=cfg.train.weight_decay, fused=dev.type == "cuda")
        batch = Batch(inp["input_ids"], inp["attention_mask"], inp["loss_mask"])

        def step(clock):
            loss, stats = run_batch(cfg, draft, features, head, draft_ids, batch, dev, mark=clock.mark)
            clock.mark()
            loss.backward()
            clock.mark()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            clock.mark()
            return loss, stats[0].loss

        result = timed_loop(spec, dev, step)
        set_deterministic(False)
    attention = cfg.train.attention
    if attention == "auto":
        attention = "flex" if dev.type == "cuda" else "reference"
    result.update(
        package=str(src), params=sum(p.numel() for p in params), attention=attention,
        precision="fp32 weights, bf16 autocast" if dev.type == "cuda" or cfg.train.cpu_autocast else "fp32",
        loss_norm="per scored position",
        notes=[f"config overrides: {' '.join(args.ours)}"] if args.ours else [],
    )
    return result


# ------------------------------------------------------------------------------------- upstream's side
def import_upstream(root: Path, cpu: bool):
    """Upstream's modules, from `root` first on sys.path (never ours). Returns (modules, notes)."""
    if not (root / "specforge" / "algorithms" / "eagle3" / "model.py").is_file():
        raise RuntimeError(f"{root} has no specforge/algorithms/eagle3/model.py (a SpecForge tree exported from "
                           f"sgl-project/SpecForge a6b6b02 or later is expected)")
    if "specforge" in sys.modules:
        raise RuntimeError("a specforge package was imported before upstream's")
    sys.path.insert(0, str(root))
    import torch

    notes = []
    stub = None
    if cpu and not _has_triton():
        # specforge/core/loss.py imports triton at its top to define Triton kernels, which the CPU never runs.
        # Finish torch's own triton probing first (it would take the stand-in for the real package), then let
        # that one import see a stand-in, then remove it.
        import torch._dynamo
        import torch.nn.attention.flex_attention

        torch.compile(lambda x: x)  # imports the inductor backend and its triton checks
        stub = _triton_standin()
        sys.modules["triton"], sys.modules["triton.language"] = stub, stub.language
        notes.append("CPU: a stand-in `triton` module was present only while upstream's specforge/core/loss.py "
                     "was imported (it defines Triton kernels at import time)")
    try:
        import specforge.core.loss as up_loss
    finally:
        if stub is not None:
            del sys.modules["triton"], sys.modules["triton.language"]
    import specforge.algorithms.eagle3.model as up_model
    from specforge.modeling.auto import AutoDraftModel
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.runtime.contracts import TrainBatch
    from specforge.training.strategies.base import Eagle3TrainStrategy

    import specforge

    src = Path(specforge.__file__).resolve().parent
    if src != (root / "specforge").resolve():
        raise RuntimeError(f"upstream side imported specforge from {src}, not {root / 'specforge'}")
    if cpu:
        # Its LogSoftmaxLoss is a Triton kernel (GPU only); the same file's reference computes the same loss.
        class ReferenceLoss:
            @staticmethod
            def apply(logits, target_p, position_mask):
                return up_loss._compute_loss(logits, target_p, position_mask)

        up_model.LogSoftmaxLoss = ReferenceLoss
        notes.append("CPU: loss = upstream's reference specforge/core/loss.py:_compute_loss instead of its "
                     "Triton LogSoftmaxLoss (same value: summed over the draft vocab, mean over B*T positions)")
    heavy = sorted({k.split(".")[0] for k in sys.modules} & {"sglang", "yunchang", "wandb", "datasets", "pydantic"})
    if heavy:
        notes.append(f"imported: {', '.join(heavy)}")
    mods = types.SimpleNamespace(model=up_model, AutoDraftModel=AutoDraftModel, TargetHead=TargetHead,
                                 BF16Optimizer=BF16Optimizer, TrainBatch=TrainBatch,
                                 Eagle3TrainStrategy=Eagle3TrainStrategy, src=src)
    return mods, notes


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _triton_standin():
    def jit(fn):
        def launch(*a, **k):
            raise RuntimeError("a Triton kernel was launched on the CPU")

        class Kernel:
            def __getitem__(self, grid):
                return launch

        return Kernel()

    triton = types.ModuleType("triton")
    language = types.ModuleType("triton.language")
    language.constexpr = object  # parameter annotations of the kernels, evaluated at definition
    triton.jit, triton.language = jit, language
    triton.next_power_of_2 = lambda n: 1 << max(0, int(n) - 1).bit_length()
    return triton


def upstream_backend(spec: dict, args) -> str:
    dev_type = spec["device"]
    backend = args.upstream_attention or ("flex_attention" if dev_type == "cuda" else "sdpa")
    if backend == "flex_attention" and dev_type == "cpu":
        raise RuntimeError("upstream's flex_attention backend cannot train on the CPU: torch's FlexAttention has no "
                           "CPU backward (NotImplementedError); use --upstream-attention sdpa")
    return backend


def build_upstream(spec: dict, args, up, backend: str, inp: dict):
    """Upstream's draft (our sizes; embedding, lm_head and vocab map from `inp`, which it pops), its
    OnlineEagle3Model and its Eagle3TrainStrategy, as its model providers build them."""
    import torch
    from transformers import LlamaConfig

    dev = torch.device(spec["device"])
    dtype = torch.bfloat16  # upstream's model.torch_dtype default (config/schema.py)
    # The draft config upstream generates from a target (algorithms/eagle3/providers.py: llama, 1 layer), with
    # our sizes. norm_output is left at upstream's default (its compute_logits applies the final norm).
    cfg = LlamaConfig(hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
                      num_attention_heads=spec["num_attention_heads"], num_key_value_heads=spec["num_key_value_heads"],
                      head_dim=spec["head_dim"], num_hidden_layers=1, vocab_size=spec["vocab_size"],
                      rms_norm_eps=spec["rms_norm_eps"], max_position_embeddings=spec["max_position_embeddings"],
                      rope_parameters=spec["rope_parameters"], hidden_act="silu", tie_word_embeddings=False,
                      pretraining_tp=1)
    cfg.draft_vocab_size = spec["draft_vocab_size"]
    cfg.architectures = ["LlamaForCausalLMEagle3"]
    # algorithms/model_providers.py:build_eagle3_draft, with the embedding and vocab mapping from memory
    draft = up.AutoDraftModel.from_config(cfg, attention_backend=backend, torch_dtype=dtype)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(inp.pop("embed"))  # what load_embedding copies from the target
        draft.t2d.copy_(inp.pop("t2d"))  # what load_vocab_mapping copies
        draft.d2t.copy_(inp.pop("d2t"))
    draft.freeze_embedding()
    draft = draft.to(device=dev, dtype=dtype)
    # algorithms/model_providers.py:build_eagle3_model
    model = up.model.OnlineEagle3Model(draft_model=draft, length=spec["ttt"], attention_backend=backend)
    model = model.to(device=dev, dtype=dtype)
    # TargetHead.from_pretrained, with the lm_head from memory (its __init__ reads only config.json)
    with tempfile.TemporaryDirectory() as folder:
        LlamaConfig(hidden_size=spec["hidden_size"], vocab_size=spec["vocab_size"]).save_pretrained(folder)
        head = up.TargetHead(folder)
    with torch.no_grad():
        head.fc.weight.copy_(inp.pop("lm_head"))
    head.freeze_weights()
    head = head.eval().to(device=dev, dtype=torch.bfloat16)
    strategy = up.Eagle3TrainStrategy(model, target_head=head, ploss_decay=0.8,
                                      compact_teacher=args.upstream_compact_teacher)
    return draft, model, strategy


def run_upstream(spec: dict, args) -> dict:
    backend = upstream_backend(spec, args)
    up, notes = import_upstream(Path(args.upstream).resolve(), cpu=spec["device"] == "cpu")
    import torch

    dev = torch.device(spec["device"])
    inp = make_inputs(spec)
    draft, model, strategy = build_upstream(spec, args, up, backend, inp)
    total = spec["warmup"] + spec["steps"]
    opt = up.BF16Optimizer(draft, lr=spec["lr"], max_grad_norm=0.5, total_steps=total + 1, warmup_ratio=0.0,
                           lr_scheduler="constant")
    batch = up.TrainBatch(
        sample_ids=[str(i) for i in range(spec["batch"])], strategy="eagle3",
        tensors={"input_ids": inp["input_ids"], "attention_mask": inp["attention_mask"],
                 "loss_mask": inp["loss_mask"].long(), "hidden_state": inp["aux"], "target": inp["final"]},
        metadata={"target_repr": "hidden_state"})
    model.train()
    clock = [None]
    seen = [False]

    def labels_done(*_):  # draft.fc runs first thing after the teacher (algorithms/eagle3/model.py:315)
        if not seen[0]:
            seen[0] = True
            clock[0].mark()

    draft.fc.register_forward_pre_hook(labels_done)

    def step(c):
        clock[0], seen[0] = c, False
        out = strategy.forward_loss(batch)
        c.mark()
        out.loss.backward()
        c.mark()
        opt.step()
        c.mark()
        return out.loss, out.metrics["plosses"][0]

    result = timed_loop(spec, dev, step)
    if args.upstream_compact_teacher:
        notes.append("compact teacher (offline, core/compact_teacher.py)")
    result.update(
        package=str(up.src), params=sum(p.numel() for p in draft.parameters() if p.requires_grad),
        attention=backend, precision="bf16 weights, fp32 masters", loss_norm="sum over scored / (B*T)",
        notes=notes)
    return result


# ------------------------------------------------------------------------- features mode (issue 18 item 2)
# Same data, same budget, acceptance: the parent runs the target once over prepared conversations (our data
# code, our hooks) and writes the batches to one file; each side trains its own draft on them for the same
# epochs, in the same order, with the same batch, constant lr and clip, then evaluates the held-out batches.
FEATURE_KEYS = ("input_ids", "attention_mask", "loss_mask", "aux", "final")
TOKEN_KEYS = FEATURE_KEYS[:3]  # what FILE holds per batch with --online (each side runs the target itself)


def online_featurizer(spec: dict, dev):
    """--online: fn(batch of TOKEN_KEYS on dev) -> the batch with aux [B, T, 3H] and final [B, T, H] in bf16, from
    the target run in this process. Plain transformers and torch only (the upstream side cannot import our
    specforge): the model loaded as `specforge.targets.load_target` loads it (from_pretrained on the same folder,
    the same dtype, eval), hooked as `FeatureCapture` hooks it (aux: the input of each aux layer; final: the
    final norm's output), and run as `FeatureCapture.run` runs it (the decoder alone, no cache). So both sides
    see the same features without a file of them; tests/test_compare_upstream.py holds this to FeatureCapture."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["target_folder"], dtype=getattr(torch, spec["target_dtype"]))
    model = model.to(dev).eval().requires_grad_(False)
    base = model.model
    store = {}
    for j in spec["aux_layer_ids"]:
        base.layers[j].register_forward_pre_hook(
            lambda module, args, kwargs, j=j: store.__setitem__(j, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
    base.norm.register_forward_hook(lambda module, args, output: store.__setitem__("final", output))

    @torch.no_grad()
    def featurize(b: dict) -> dict:
        store.clear()
        base(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=None, use_cache=False)
        aux = torch.cat([store[j] for j in spec["aux_layer_ids"]], dim=-1)
        out = dict(b, aux=aux.to(torch.bfloat16), final=store["final"].to(torch.bfloat16))
        store.clear()
        return out

    return featurize


_FEATURIZERS: dict = {}


def batches_on(spec: dict, dev):
    """fn(stored batch) -> the batch on `dev` as each side trains on it: with its stored features, or with
    --online the target's, computed here (the target loaded once per process)."""
    featurize = None
    if spec.get("online"):
        key = (spec["target_folder"], str(dev))
        if key not in _FEATURIZERS:
            _FEATURIZERS[key] = online_featurizer(spec, dev)
        featurize = _FEATURIZERS[key]

    def on(b: dict) -> dict:
        if featurize is None:
            return {k: b[k].to(dev, non_blocking=True) for k in FEATURE_KEYS}
        return featurize({k: b[k].to(dev, non_blocking=True) for k in TOKEN_KEYS})

    return on


def build_features(args) -> dict:
    """Writes `args.features` from `args.data` and `args.target` (parent only; our specforge); returns the
    spec both sides train from."""
    import torch

    from specforge.config import load_config
    from specforge.data.batching import collate, epoch_batches
    from specforge.data.template import ensure_chat_template
    from specforge.data.vocab import build_vocab, count_tokens, coverage
    from specforge.eagle3.draft import draft_config
    from specforge.eagle3.train import FLEX_PAD
    from specforge.prepare import load_samples
    from specforge.targets import (
        FeatureCapture,
        TargetHead,
        aux_layer_ids,
        load_target,
        target_folder,
        text_config,
    )

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    overrides = [f"device={device}", f"data.train_path={Path(args.data).resolve()}",
                 f"data.eval_every={args.eval_every}", *args.ours]
    if args.seq:
        overrides.append(f"data.max_length={args.seq}")
    if Path(args.target).is_dir():
        args.target = str(Path(args.target).resolve())  # the sides run in another working directory
    cfg = load_config(args.target, overrides=overrides)
    target, tok = load_target(cfg.target, dev)
    ensure_chat_template(tok, cfg.data.chat_template)
    train_samples, eval_samples = load_samples(cfg, target, tok)
    if not train_samples or not eval_samples:
        raise SystemExit(f"{args.data}: {len(train_samples)} training and {len(eval_samples)} held-out "
                         f"conversations (--eval-every {args.eval_every}); both must be non-empty")
    head = TargetHead.from_model(target)
    vocab = head.embed.weight.shape[0]
    counts = count_tokens(train_samples, vocab)
    d2t, t2d = build_vocab(counts, min(cfg.target.draft.draft_vocab_size, vocab))
    aux = aux_layer_ids(cfg.target, target)
    tcfg = text_config(target.config)
    dcfg = draft_config(target.config, cfg.target.draft, vocab, aux)
    batch = args.batch or cfg.train.batch_size
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    capture = FeatureCapture(target, aux)

    def host(x):  # the hooks reuse their buffers
        return x.to("cpu", torch.bfloat16, copy=True)

    def run(samples, index_lists):
        out = []
        for idx in index_lists:
            b = collate([samples[i] for i in idx], pad_id)
            if args.online:  # the tokens only: each side runs the target over the padded batch itself
                if dev.type == "cuda":
                    b = b.pad_to_multiple(FLEX_PAD)
                out.append({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "loss_mask": b.loss_mask})
                continue
            with torch.no_grad():
                f = capture.run(b.input_ids.to(dev), b.attention_mask.to(dev))
            b.aux, b.prenorm = host(f.aux), host(f.final)
            if dev.type == "cuda":  # a few lengths only: both sides' flex attention compiles per length
                b = b.pad_to_multiple(FLEX_PAD)
            out.append({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "loss_mask": b.loss_mask,
                        "aux": b.aux, "final": b.prenorm})
        return out

    t0 = time.perf_counter()
    lengths = [len(s.input_ids) for s in train_samples]
    train_batches = run(train_samples, epoch_batches(len(train_samples), lengths, batch, args.seed, 0))
    by_len = sorted(range(len(eval_samples)), key=lambda i: len(eval_samples[i].input_ids))
    eval_batches = run(eval_samples, [by_len[i:i + batch] for i in range(0, len(by_len), batch)])
    capture.remove()
    spec = {
        "mode": "features", "shape": str(args.target), "target": str(args.target), "preset": None,
        "device": device, "hidden_size": dcfg.hidden_size, "intermediate_size": dcfg.intermediate_size,
        "num_attention_heads": dcfg.num_attention_heads, "num_key_value_heads": dcfg.num_key_value_heads,
        "head_dim": dcfg.head_dim, "vocab_size": dcfg.vocab_size, "draft_vocab_size": dcfg.draft_vocab_size,
        "rms_norm_eps": dcfg.rms_norm_eps, "max_position_embeddings": dcfg.max_position_embeddings,
        "rope_parameters": dict(dcfg.rope_parameters), "num_target_layers": dcfg.num_target_layers,
        "aux_layer_ids": aux, "seq": cfg.data.max_length, "batch": batch, "ttt": args.ttt,
        "seed": args.seed, "eval_every": args.eval_every, "data": str(Path(args.data).resolve()),
        "train_conversations": len(train_samples), "eval_conversations": len(eval_samples),
        "train_batches": len(train_batches), "eval_batches": len(eval_batches),
        "train_tokens": sum(lengths), "eval_tokens": sum(len(s.input_ids) for s in eval_samples),
        "vocab_coverage": coverage(counts, t2d), "target_config": target.config.to_dict(),
        "target_rms_norm_eps": tcfg.rms_norm_eps, "feature_seconds": time.perf_counter() - t0,
        "online": bool(args.online), "target_folder": str(target_folder(cfg.target)),
        "target_dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
    }
    tmp = f"{args.features}.tmp"  # renamed when whole: a side started beside this one never reads half a file
    torch.save({"spec": spec, "embed": head.embed.weight.detach().to("cpu", torch.bfloat16),
                "lm_head": head.lm_head_weight.detach().to("cpu", torch.bfloat16),
                "norm": head.norm.weight.detach().to("cpu", torch.float32), "d2t": d2t, "t2d": t2d,
                "train": train_batches, "eval": eval_batches}, tmp)
    os.replace(tmp, args.features)
    del target, head
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the sides run in their own processes
    return spec


def batch_order(num_batches: int, seed: int, epoch: int) -> list[int]:
    """The order of the stored train batches in an epoch: the same on both sides."""
    import torch

    return torch.randperm(num_batches, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def load_features(path: str) -> dict:
    import torch

    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def train_loop(spec: dict, feats: dict, dev, step_fn) -> dict:
    """`--epochs` over the stored train batches in `batch_order`; step_fn(tensors on dev) -> loss tensor. With
    --online the time includes the target's forward (the same on both sides)."""
    import torch

    on = batches_on(spec, dev)
    losses, tokens = [], 0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for epoch in range(spec["epochs"]):
        for n, i in enumerate(batch_order(len(feats["train"]), spec["seed"], epoch)):
            b = on(feats["train"][i])
            tokens += int(feats["train"][i]["attention_mask"].sum())
            losses.append(step_fn(b).detach().float())
            if n % 50 == 0:
                print(f"  epoch {epoch + 1} batch {n + 1}: loss {losses[-1].item():.4f}", file=sys.stderr, flush=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    losses = torch.stack(losses).cpu().tolist()
    tail = losses[-min(20, len(losses)):]
    out = {"epochs": spec["epochs"], "steps": len(losses), "train_seconds": elapsed, "tokens_per_s": tokens / elapsed,
           "final_loss": sum(tail) / len(tail), "losses": losses}
    if dev.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def acc_from_logits(logits, final, lm_head, loss_mask, d2t, k: int):
    """Our definition of step-k accuracy (eagle3/ttt.py ttt_loss, kernels/fused_loss.py): position t is scored
    when token t+2+k is trained on (loss_mask); it is correct when the draft's top-1 (mapped to a target id)
    equals the target's argmax at t+1+k (full vocab: an argmax outside the draft vocab is a miss).
    `logits` [B, T, Vd] of TTT step k, position t predicting token t+2+k. Returns (correct, count)."""
    t = loss_mask.shape[1]
    span = t - 2 - k
    if span <= 0:
        return 0, 0
    scored = loss_mask[:, 2 + k:].bool()
    rows = final[:, 1 + k:1 + k + span][scored]
    target_arg = (rows @ lm_head.t()).float().argmax(-1)  # as soft_labels: the matmul in the features' dtype
    pred = logits[:, :span].argmax(-1)[scored]
    pred = pred + d2t[pred]
    return int((pred == target_arg).sum()), int(scored.sum())


def run_ours_features(spec: dict, args) -> dict:
    import torch
    from torch import nn
    from transformers import AutoConfig

    import specforge
    from specforge.config import load_config
    from specforge.data.batching import Batch
    from specforge.eagle3.train import build_draft, evaluate, run_batch
    from specforge.layers import RMSNorm
    from specforge.parallel.mesh import Dist
    from specforge.targets import TargetHead

    src = Path(specforge.__file__).resolve().parent
    if src != REPO / "specforge":
        raise RuntimeError(f"our side imported specforge from {src}, not {REPO / 'specforge'}")
    dev = torch.device(spec["device"])
    feats = load_features(spec["features"])
    overrides = [f"device={dev.type}", f"train.batch_size={spec['batch']}", f"train.ttt_length={spec['ttt']}",
                 f"train.seed={spec['seed']}", f"train.lr={spec['lr']}", f"train.grad_clip={spec['clip']}",
                 "train.warmup_steps=0", "train.min_lr_ratio=1.0", *spec["ours"]]
    cfg = load_config(spec["target"], overrides=overrides)
    tc = dict(spec["target_config"])
    tcfg = AutoConfig.for_model(tc.pop("model_type"), **tc)
    embed = nn.Embedding.from_pretrained(feats["embed"].to(dev), freeze=True)
    norm = RMSNorm(spec["hidden_size"], spec["target_rms_norm_eps"]).to(dev)
    with torch.no_grad():
        norm.weight.copy_(feats["norm"])  # read by train.init_head_from_target only (the features come normed)
    head = TargetHead(tcfg, embed, norm, feats["lm_head"].to(dev))
    torch.manual_seed(spec["seed"])
    draft = build_draft(cfg, head, spec["aux_layer_ids"], feats["d2t"], feats["t2d"])  # host tensors, as in train
    if draft.config.draft_vocab_size != spec["draft_vocab_size"]:
        raise RuntimeError(f"our draft vocab {draft.config.draft_vocab_size}, the spec {spec['draft_vocab_size']}")
    draft_ids = draft.target_ids().to(dev)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay, fused=dev.type == "cuda")

    def features(b):  # stored: the final hidden state, normed
        return b.aux, b.prenorm

    def as_batch(b):
        return Batch(b["input_ids"], b["attention_mask"], b["loss_mask"].bool(), aux=b["aux"], prenorm=b["final"])

    def step(b):
        loss, _ = run_batch(cfg, draft, features, head, draft_ids, as_batch(b), dev)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    draft.train()
    result = train_loop(spec, feats, dev, step)
    on = batches_on(spec, dev)
    source = types.SimpleNamespace(eval_batches=lambda: (as_batch(on(b)) for b in feats["eval"]))
    ev = evaluate(cfg, draft, features, head, draft_ids, source, dev, Dist(1, 0, 0, 1, 1, 0, 0, dev))
    attention = cfg.train.attention
    if attention == "auto":
        attention = "flex" if dev.type == "cuda" else "reference"
    result.update(
        acc=[ev[f"acc_{k}"] for k in range(spec["ttt"])], package=str(src),
        params=sum(p.numel() for p in params), attention=attention,
        precision="fp32 weights, bf16 autocast" if dev.type == "cuda" or cfg.train.cpu_autocast else "fp32",
        acc_source="specforge.eagle3.train.evaluate (run_batch -> ttt_loss statistics)",
        notes=[f"train.init_head_from_target={cfg.train.init_head_from_target}"]
        + ([f"config overrides: {' '.join(spec['ours'])}"] if spec["ours"] else []))
    return result


def run_upstream_features(spec: dict, args) -> dict:
    backend = upstream_backend(spec, args)
    up, notes = import_upstream(Path(args.upstream).resolve(), cpu=spec["device"] == "cpu")
    import torch

    dev = torch.device(spec["device"])
    feats = load_features(spec["features"])
    torch.manual_seed(spec["seed"])
    inp = {k: feats[k] for k in ("embed", "lm_head", "t2d", "d2t")}
    draft, model, strategy = build_upstream(spec, args, up, backend, inp)
    total = spec["epochs"] * len(feats["train"])
    opt = up.BF16Optimizer(draft, lr=spec["lr"], max_grad_norm=spec["clip"], total_steps=total + 1,
                           warmup_ratio=0.0, lr_scheduler="constant")

    def train_batch(b):
        return up.TrainBatch(
            sample_ids=[str(i) for i in range(b["input_ids"].shape[0])], strategy="eagle3",
            tensors={"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                     "loss_mask": b["loss_mask"].long(), "hidden_state": b["aux"], "target": b["final"]},
            metadata={"target_repr": "hidden_state"})

    def step(b):
        out = strategy.forward_loss(train_batch(b))
        out.loss.backward()
        opt.step()  # clips, steps the fp32 masters, zeroes the gradients, copies back to bf16
        return out.loss

    model.train()
    result = train_loop(spec, feats, dev, step)
    # Held-out: its own forward (OnlineEagle3Model through forward_loss); the draft logits of every TTT step are
    # taken where its forward computes them (draft.compute_logits), and scored with our definition.
    model.eval()
    captured = []
    compute_logits = draft.compute_logits

    def capture(hidden):
        logits = compute_logits(hidden)
        captured.append(logits.detach())
        return logits

    draft.compute_logits = capture
    lm_head = feats["lm_head"].to(dev)
    ttt = spec["ttt"]
    correct, count, own_correct, own_denom = [0] * ttt, [0] * ttt, [0.0] * ttt, [0.0] * ttt
    on = batches_on(spec, dev)
    with torch.no_grad():
        for b in feats["eval"]:
            b = on(b)
            captured.clear()
            out = strategy.forward_loss(train_batch(b))
            if len(captured) != ttt:
                raise RuntimeError(f"upstream's forward computed draft logits {len(captured)} times, not {ttt}")
            for k, logits in enumerate(captured):
                c, n = acc_from_logits(logits, b["final"], lm_head, b["loss_mask"], draft.d2t, k)
                correct[k] += c
                count[k] += n
                own_correct[k] += float(out.metrics["acc_corrects"][k])
                own_denom[k] += float(out.metrics["acc_denoms"][k])
    draft.compute_logits = compute_logits
    result.update(
        acc=[c / max(n, 1) for c, n in zip(correct, count)], eval_positions=count,
        upstream_own_acc=[c / max(d, 1e-6) for c, d in zip(own_correct, own_denom)],
        package=str(up.src), params=sum(p.numel() for p in draft.parameters() if p.requires_grad),
        attention=backend, precision="bf16 weights, fp32 masters",
        acc_source="its draft logits per TTT step (draft.compute_logits inside OnlineEagle3Model.forward), "
                   "scored by this harness with our definition (acc_from_logits)",
        notes=notes + ["upstream_own_acc: its acc_corrects/acc_denoms (loss mask shifted by k, not k+2)"])
    return result


# ----------------------------------------------------------------------------------------- the parent
def side_main(args) -> int:
    spec = json.loads(Path(args.spec).read_text())
    try:
        if spec.get("mode") == "features":
            result = (run_ours_features if args.side == "ours" else run_upstream_features)(spec, args)
        else:
            result = (run_ours if args.side == "ours" else run_upstream)(spec, args)
        result["ok"] = True
    except Exception as e:  # one line for the table; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result = {"ok": False, "error": f"{type(e).__name__}: {msg}"[:300]}
    result["versions"] = versions()
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def side_env() -> dict:
    """The environment of a side's process. It runs in a temporary folder, so relative PYTHONPATH entries
    (`PYTHONPATH=.` on a machine without an install) are made absolute: the side then imports what the parent
    did."""
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return env


def run_side(side: str, spec_file: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{side}.json"
        python = args.upstream_python if side == "upstream" and args.upstream_python else sys.executable
        cmd = [python, str(Path(__file__).resolve()), "--side", side, "--spec", str(spec_file), "--result", str(out)]
        if side == "upstream":
            cmd += ["--upstream", str(Path(args.upstream).resolve())]
            if args.upstream_attention:
                cmd += ["--upstream-attention", args.upstream_attention]
            if args.upstream_compact_teacher:
                cmd.append("--upstream-compact-teacher")
        elif args.ours and not args.features:  # features mode: the overrides travel in the spec
            cmd += ["--ours", *args.ours]
        print(f"[{side}] running ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=tempfile.gettempdir(), env=side_env())
        if args.verbose or proc.returncode:
            print("\n".join(f"[{side}] {line}" for line in proc.stdout.splitlines()[-(10**6 if args.verbose else 25):]),
                  file=sys.stderr, flush=True)
        if out.is_file():
            return json.loads(out.read_text())
        tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or [""]
        return {"ok": False, "error": f"exited with code {proc.returncode}, no result: {tail[0][:200]}"}


def fmt_losses(xs: list, n: int = 6) -> str:
    if not xs:
        return ""
    shown = " ".join(f"{x:.3f}" for x in xs[:n])
    return shown + (f" ... {xs[-1]:.3f}" if len(xs) > n else "")


def table(spec: dict, device: str, sides: dict) -> str:
    names = list(sides)
    rows = []

    def row(label, fn):
        cells = []
        for n in names:
            r = sides[n]
            if not r.get("ok"):
                cells.append(f"**failed**: {r.get('error', '')}" if label == "status" else "")
            else:
                try:
                    cells.append(fn(r))
                except (KeyError, TypeError):
                    cells.append("")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    row("status", lambda r: "ok")
    row("specforge package", lambda r: f"`{r['package']}`")
    row("torch / transformers", lambda r: f"{r['versions']['torch']} / {r['versions']['transformers']}")
    row("TTT attention", lambda r: r["attention"])
    row("precision", lambda r: r["precision"])
    row("trainable params", lambda r: f"{r['params']:,}")
    row("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}")
    row("ms / step", lambda r: f"{r['step_ms']:.1f}")
    for p, label in zip(PHASES, ("labels (lm_head + soft labels)", "draft fwd + loss (TTT)", "backward",
                                 "optimizer")):
        row(f"  {label}",
            lambda r, p=p: f"{r['phase_ms'][p]:.1f} ({r['phase_ms'][p] / sum(r['phase_ms'].values()):.0%})")
    row("peak memory GiB", lambda r: f"{r['peak_mem_gib']:.2f} ({r['peak_mem_kind']})")
    for p in PHASES:  # on a GPU: where the peak falls, and what stays allocated (after the draft forward: the
        # weights, optimizer state and what autograd saved for backward)
        row(f"  peak in {p} / allocated after it, GiB",
            lambda r, p=p: f"{r['phase_peak_gib'][p]:.2f} / {r['phase_end_gib'][p]:.2f}")
    row("loss normalisation", lambda r: r["loss_norm"])
    row("total loss, step 1..", lambda r: fmt_losses(r["losses"]))
    row("step-0 loss, step 1..", lambda r: fmt_losses(r["step0_losses"]))
    row("notes", lambda r: "; ".join(r.get("notes") or []) or "-")
    head = (f"\n## EAGLE-3 training step, ours vs upstream SpecForge: shape {spec['shape']} (hidden "
            f"{spec['hidden_size']}, {spec['num_attention_heads']}/{spec['num_key_value_heads']} heads x "
            f"{spec['head_dim']}, intermediate {spec['intermediate_size']}, vocab {spec['vocab_size']} -> "
            f"{spec['draft_vocab_size']}), {device}, batch {spec['batch']} x {spec['seq']} tokens, TTT "
            f"{spec['ttt']}, {spec['steps']} timed steps after {spec['warmup']} warm-up, lr {spec['lr']}\n")
    return head + "\n| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n" + "\n".join(rows)


def chain_estimate(acc: list) -> float:
    """The chain acceptance-length estimate of `specforge train`'s eval, from acc_k (train.summarize)."""
    from specforge.eagle3.train import summarize
    from specforge.eagle3.ttt import StepStats

    return summarize([[StepStats(0.0, a, 0.0, 1) for a in acc]])["chain_accept_len_5"]


def features_table(spec: dict, device: str, sides: dict) -> str:
    ttt = spec["ttt"]
    head = (f"\n## EAGLE-3 drafts trained on the same features, ours vs upstream SpecForge: target {spec['target']} "
            f"(hidden {spec['hidden_size']}, vocab {spec['vocab_size']} -> {spec['draft_vocab_size']}, "
            f"{spec['vocab_coverage']:.1%} of train answer tokens in the draft vocab), {device}; "
            f"{spec['train_conversations']} train conversations ({spec['train_tokens']:,} tokens, "
            f"{spec['train_batches']} batches of {spec['batch']}), {spec['eval_conversations']} held out (every "
            f"{spec['eval_every']}th, {spec['eval_tokens']:,} tokens), max length {spec['seq']}; {spec['epochs']} "
            f"epochs, constant lr {spec['lr']}, clip {spec['clip']}, TTT {ttt}"
            + ("; --online: each side runs the target per batch (tokens/s include it)" if spec.get("online") else "")
            + "\n")
    cols = ["side", "epochs", "steps", "final train loss"] + [f"acc_{k}" for k in range(ttt)] + \
        ["chain est. (5)", "tokens/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in sides.items():
        if not r.get("ok"):
            lines.append(f"| {name} | **failed**: {r.get('error', '')} |" + " |" * (len(cols) - 2))
            continue
        cells = [name, str(r["epochs"]), str(r["steps"]), f"{r['final_loss']:.4f}"]
        cells += [f"{a:.3f}" for a in r["acc"]] + [f"{r['chain_accept_len_5']:.3f}", f"{r['tokens_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for name, r in sides.items():
        if r.get("ok"):
            notes.append(f"- {name}: `{r['package']}`, torch {r['versions']['torch']}, attention {r['attention']}, "
                         f"{r['precision']}, {r['params']:,} trainable params; acc: {r['acc_source']}"
                         + (f"; its own acc_0..: {' '.join(f'{a:.3f}' for a in r['upstream_own_acc'])}"
                            if "upstream_own_acc" in r else "")
                         + (f"; {'; '.join(r['notes'])}" if r.get("notes") else ""))
    notes.append("- final train loss: mean of the last 20 steps, each side's own normalisation (upstream divides "
                 "by all B*T positions, ours by the scored ones); compare acc, not loss")
    return head + "\n" + "\n".join(lines) + "\n\n" + "\n".join(notes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", metavar="DIR", help="upstream SpecForge tree (holding specforge/)")
    ap.add_argument("--shape", default="tiny", help="tiny (CPU) or a specforge.model_shapes shape, e.g. llama3.1-8b")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048 on a GPU, 128 on the CPU)")
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (default 1; with --features: the "
                                                             "target's train.batch_size)")
    ap.add_argument("--ttt", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=None, help="constant lr (default 1e-4; with --features: the "
                                                             "target's train.lr)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--only", choices=("ours", "upstream"), help="run one side only")
    ap.add_argument("--ours", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for our side")
    ap.add_argument("--upstream-attention", choices=("flex_attention", "sdpa", "fa"),
                    help="upstream's backend (default: flex_attention on CUDA, sdpa on the CPU)")
    ap.add_argument("--upstream-compact-teacher", action="store_true",
                    help="upstream's offline compact teacher (no [B, T, V] float32 logits)")
    ap.add_argument("--upstream-python", metavar="PY", help="interpreter for the upstream side (e.g. a venv with "
                                                              "upstream's pinned torch/transformers)")
    ap.add_argument("--features", metavar="FILE", help="acceptance mode: train both drafts on the batches of this "
                    ".pt file (written first from --data and --target when --data is given) and compare held-out acc")
    ap.add_argument("--data", metavar="JSONL", help="prepared conversations (what `specforge prepare-data` writes)")
    ap.add_argument("--online", action="store_true", help="with --features and --data: FILE holds the token batches "
                    "only and each side runs the target over each batch itself (the same forward and hooks on both "
                    "sides), for data whose features would not fit on disk; tokens/s then include the target")
    ap.add_argument("--target", default="smollm2-135m", help="with --data: a configs/targets name or an HF folder")
    ap.add_argument("--eval-every", type=int, default=50, help="with --data: hold out every k-th conversation")
    ap.add_argument("--epochs", type=int, default=None, help="with --features (default: the target's train.epochs)")
    ap.add_argument("--clip", type=float, default=0.5, help="with --features: gradient clip norm, both sides")
    ap.add_argument("--out", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--merge", nargs="+", metavar="FILE", help="print one table from the --out files of runs with "
                    "--only ours and --only upstream (e.g. run side by side on one GPU from the same --features)")
    ap.add_argument("--verbose", action="store_true", help="show each side's output")
    ap.add_argument("--side", choices=("ours", "upstream"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        return side_main(args)
    if args.merge:
        return merge_main(args)
    if args.only != "ours" and not args.upstream:
        ap.error("--upstream DIR is needed (or --only ours)")
    if args.features:
        return features_main(args)
    args.batch = args.batch or 1
    args.lr = args.lr if args.lr is not None else 1e-4
    spec = resolve_spec(args)
    return report(spec, run_sides(spec, args), args, table)


def run_sides(spec: dict, args) -> dict:
    """Each side asked for (`--only`), in its own subprocess, reading `spec` from a temporary file."""
    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        for side in ("ours", "upstream"):
            if args.only in (None, side):
                sides[side] = run_side(side, spec_file, args)
    return sides


def report(spec: dict, sides: dict, args, make_table, device: str | None = None, upstream: str | None = None) -> int:
    """Print the sides' table, write the JSON (`--out`); exit status 1 if a side failed. `device` and `upstream`:
    those of the runs merged (`--merge`); by default this machine's and `--upstream`."""
    if device is None:
        import torch

        device = torch.cuda.get_device_name() if spec["device"] == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(make_table(spec, device, sides), flush=True)
    if args.out:
        res = {"spec": spec, "device": device, "upstream": upstream or args.upstream, "sides": sides}
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0 if all(r.get("ok") for r in sides.values()) else 1


def merge_main(args) -> int:
    """One table from several runs' --out files (one side each, or both): they must share the spec (the same
    features file and training settings), and a side may come from one file only."""
    runs = [(f, json.loads(Path(f).read_text())) for f in args.merge]
    first, spec = runs[0][0], runs[0][1]["spec"]
    sides = {}
    for f, r in runs:
        if r["spec"] != spec:
            diff = sorted(k for k in set(r["spec"]) | set(spec) if r["spec"].get(k) != spec.get(k))
            raise SystemExit(f"--merge: {f} was run with another spec than {first} (differs in: {', '.join(diff)})")
        for name, side in r["sides"].items():
            if name in sides:
                raise SystemExit(f"--merge: the {name} side is in more than one file ({f})")
            sides[name] = side
    make_table = features_table if spec.get("mode") == "features" else table
    return report(spec, sides, args, make_table, runs[0][1]["device"], runs[0][1]["upstream"])


def features_main(args) -> int:
    from specforge.config import load_config

    if args.data:
        what = "writing the token batches of" if args.online else "running the target over"
        print(f"features: {what} {args.data} ...", file=sys.stderr, flush=True)
        spec = build_features(args)
        print(f"features: wrote {args.features} in {spec['feature_seconds']:.1f} s", file=sys.stderr, flush=True)
    elif not Path(args.features).is_file():
        raise SystemExit(f"--features {args.features}: no such file (pass --data to write it)")
    else:  # reused as written: stored features, or token batches (--online) that each side runs the target over
        spec = load_features(args.features)["spec"]
        if args.online and not spec.get("online"):
            raise SystemExit(f"--online: {args.features} holds stored features, not token batches; drop --online to "
                             f"train on them, or pass --data to write token batches")
    tcfg = load_config(spec["target"], overrides=list(args.ours)).train
    spec = dict(spec, features=str(Path(args.features).resolve()), epochs=args.epochs or tcfg.epochs,
                lr=args.lr if args.lr is not None else tcfg.lr, clip=args.clip, ours=list(args.ours), ttt=args.ttt,
                seed=args.seed)
    if args.batch and args.batch != spec["batch"]:
        raise SystemExit(f"--batch {args.batch}: {args.features} holds batches of {spec['batch']}; rewrite it "
                         f"with --data")
    sides = run_sides(spec, args)
    for r in sides.values():
        if r.get("ok"):
            r["chain_accept_len_5"] = chain_estimate(r["acc"])
    return report(spec, sides, args, features_table)


if __name__ == "__main__":
    sys.exit(main())
