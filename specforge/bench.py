"""`specforge bench`: what a draft buys at inference, measured on a prompt set.

Every turn is decoded twice with the same target forward: plainly, one token per target step, and
speculatively with the draft. At greedy decoding the two outputs must be identical (it is counted);
acceptance length, per-position acceptance and tokens/s come from the speculative run."""

from __future__ import annotations

import gc
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .config import Config
from .data.conversations import bundled_path, read_jsonl
from .data.template import ensure_chat_template, prompt_ids
from .eagle3.checkpoint import load_draft
from .eagle3.acceptance import chain_accept_lengths, match_lengths
from .eagle3.decoder import SpecDecoder
from .files import write_text
from .kernels.batch_invariant import batch_invariant
from .parallel.mesh import Dist, init_distributed, is_main, launched, shutdown
from .parallel.tensor_parallel import load_target_tp
from .static_target import StaticTarget
from .targets import decoder_parts, load_target, text_config


def run_bench(cfg: Config) -> dict:
    with batch_invariant(cfg.bench.deterministic):
        try:
            return _run_bench(cfg)
        finally:
            gc.unfreeze()  # `warm_up` froze the heap for the timed turns


def _processes(cfg: Config) -> Dist:
    """Under a launcher (`--nproc N`) every process decodes the same prompts with its slice of the target
    (tensor parallel over all N); the draft is replicated, so all take the same decisions. Rank 0 reports."""
    if launched():
        world = int(os.environ["WORLD_SIZE"])
        if cfg.parallel.tp_size not in (1, world):
            raise SystemExit(f"bench: parallel.tp_size={cfg.parallel.tp_size}, but {world} processes: the bench "
                             f"splits the target over all of them (leave parallel.tp_size out)")
        cfg.parallel.tp_size = world
    return init_distributed(cfg)


@dataclass
class BenchModels:
    tok: object
    draft: object
    draft_dir: Path
    static: StaticTarget
    compile: bool
    decoder: Callable[[int, int, int], SpecDecoder]  # (spec_steps, topk, num_draft_tokens) -> a decoder


def load_models(cfg: Config, dist: Dist, settings: list[tuple[int, int, int]]) -> BenchModels:
    """The target, the draft, one static target for every decoder of the run (one KV cache, one compiled
    forward) and a maker of decoders over it."""
    b, device = cfg.bench, dist.device
    if dist.tp > 1:
        target, tok = load_target_tp(cfg.target, dist.tp_mesh, device)
    else:
        target, tok = load_target(cfg.target, device)
    ensure_chat_template(tok, cfg.data.chat_template)
    draft_dir = Path(b.draft) if b.draft else cfg.output_dir() / "draft"
    if not (draft_dir / "config.json").is_file():
        raise SystemExit(f"no draft at {draft_dir}: train one (`specforge train`) or pass bench.draft=DIR")
    embed = decoder_parts(target)[0]
    draft = load_draft(draft_dir, embed, dtype=embed.weight.dtype, device=device,
                       num_target_layers=text_config(target.config).num_hidden_layers).eval()
    # The layers the draft was trained on, as its config names them (none: the defaults of this target).
    aux_ids = draft.config.eagle_aux_hidden_state_layer_ids
    static = StaticTarget(target, aux_ids, b.max_len + max(max(t for _, _, t in settings), b.plain_block))
    compile = b.compile if b.compile is not None else device.type == "cuda" and not b.deterministic and dist.tp == 1

    def decoder(steps: int, topk: int, tokens: int) -> SpecDecoder:
        return SpecDecoder(static, draft, aux_ids, max_len=b.max_len, spec_steps=steps, topk=topk,
                           num_draft_tokens=tokens, temperature=b.temperature, seed=b.seed,
                           cuda_graphs=b.cuda_graphs and dist.tp == 1,  # collectives stay out of graphs
                           compile=compile, plain_block=b.plain_block, span_step=b.span_step,
                           prompt_step=b.prompt_step)

    return BenchModels(tok, draft, draft_dir, static, compile, decoder)


def _run_bench(cfg: Config) -> dict:
    b = cfg.bench
    dist = _processes(cfg)
    device, main = dist.device, is_main(dist)
    settings = sweep_settings(b) if b.sweep else [(b.spec_steps, b.topk, b.num_draft_tokens or b.spec_steps + 1)]
    models = load_models(cfg, dist, settings)
    tok, draft, draft_dir, static, compile, decoder = (models.tok, models.draft, models.draft_dir, models.static,
                                                      models.compile, models.decoder)
    convs = list(read_jsonl(b.prompts or bundled_path("bench_prompts.jsonl")))[: b.limit]
    common = {"target": cfg.target.name, "draft": str(draft_dir), "temperature": b.temperature,
              "max_new_tokens": b.max_new_tokens,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(draft.fc.weight.dtype), "compile": compile, "deterministic": b.deterministic,
              "tensor_parallel": dist.tp, "prompts": str(b.prompts or "bundled bench_prompts.jsonl")}
    out = Path(b.out) if b.out else cfg.output_dir() / "bench"
    if b.sweep:
        results = run_sweep(b, decoder, static, draft, tok, convs, main)
        results["settings"] = {**common, "cuda_graphs": b.cuda_graphs and dist.tp == 1}
        if main:
            write_sweep(results, out, draft_dir)
        shutdown(dist)
        return results
    dec = decoder(*settings[0])
    eos = tok.eos_token_id
    warm_up(dec, tok, b.capture_ahead)
    rows = []
    for conv in tqdm(convs, desc="bench", unit="prompt", **({} if main else {"disable": True})):
        messages = [m for m in conv.messages if m["role"] == "system"]
        for turn, text in enumerate(conv.user_turns()):
            messages.append({"role": "user", "content": text})
            ids = prompt_ids(tok, messages)
            spec, s = dec.generate(ids, b.max_new_tokens, eos)
            row = {"id": conv.id, "category": conv.category or "all", "turn": turn, "prompt_tokens": len(ids),
                   "new_tokens": s.new_tokens, "spec_seconds": s.seconds, "accept_lengths": s.accept_lengths}
            if b.baseline:
                plain, p = dec.generate_plain(ids, b.max_new_tokens, eos)
                row.update(plain_seconds=p.seconds, plain_tokens=p.new_tokens, identical=plain == spec)
            rows.append(row)
            messages.append({"role": "assistant", "content": tok.decode(spec, skip_special_tokens=True)})
    results = summarize(rows, b.spec_steps)
    results["settings"] = {**common, "spec_steps": b.spec_steps, "topk": b.topk,
                           "num_draft_tokens": dec.num_draft_tokens, "cuda_graphs": dec.cuda_graphs}
    if main:
        write_reports(results, rows, out)
        print(markdown_table(results))
        print(f"bench: wrote {out}/results.json, results.md, plot.png")
    shutdown(dist)
    return results


def warm_up(dec: SpecDecoder, tok, capture_ahead: bool = False) -> None:
    """Allocations, compilation and graph capture, outside the timed runs, as a server captures at start-up.
    Where attention reads the whole cache (`dec.whole_cache`) that is a handful of graphs; with span buckets
    it is one round per span, captured ahead only with `capture_ahead` (else when a turn first reaches the
    span, inside its timing). The prompt graphs (one per padded prompt length) are captured either way."""
    long = " ".join(["Summarize the main argument of this paragraph in one sentence."] * 30)
    for text in ("Hello", long):  # a short and a long prompt: rounds compiled and captured at both context lengths
        warm = prompt_ids(tok, [{"role": "user", "content": text}])
        for _ in range(2):  # the second pass meets the graphs captured by the first
            dec.generate(warm, 24, tok.eos_token_id)
            dec.generate_plain(warm, 24, tok.eos_token_id)
    if capture_ahead or dec.whole_cache:
        dec.capture()
    else:
        dec.capture_prompts()
    # What loading and compiling left on the heap is never traversed again by a garbage collection inside a
    # timed turn (a full collection over it takes tens of milliseconds), as serving engines do after start-up.
    gc.collect()
    gc.freeze()


def position_rates(lens: list[int], steps: int) -> list[float]:
    """Share of rounds whose draft token at position i (1-based, up to `steps`) was accepted."""
    rounds = max(1, len(lens))
    return [sum(1 for a in lens if a - 1 >= i) / rounds for i in range(1, steps + 1)]


def sweep_settings(b) -> list[tuple[int, int, int]]:
    """(spec_steps, topk, num_draft_tokens) of every setting a sweep decodes: the chains, then the trees."""
    out = [(s, 1, s + 1) for s in b.sweep_chains]
    for tree in b.sweep_trees:
        try:
            steps, topk, tokens = (int(x) for x in str(tree).split(","))
        except ValueError:
            raise SystemExit(f"bench.sweep_trees: {tree!r} is not 'spec_steps,topk,num_draft_tokens'") from None
        out.append((steps, topk, tokens))
    return out


def run_sweep(b, decoder, static, draft, tok, convs, main: bool) -> dict:
    """Plain greedy decoding of every turn once (the baseline, and the text the chain estimate reads), the
    estimated acceptance of chains of 1..sweep_max_steps from one unroll of the draft over that text, then
    each setting decoded over the same prompts and timed."""
    eos = tok.eos_token_id
    settings = sweep_settings(b)
    base = decoder(1, 1, 2)
    warm_up(base, tok, b.capture_ahead)
    turns = []  # (prompt ids, plain output)
    plain_tokens, plain_seconds = 0, 0.0
    for conv in tqdm(convs, desc="sweep: plain", unit="prompt", **({} if main else {"disable": True})):
        messages = [m for m in conv.messages if m["role"] == "system"]
        for text in conv.user_turns():
            messages.append({"role": "user", "content": text})
            ids = prompt_ids(tok, messages)
            plain, p = base.generate_plain(ids, b.max_new_tokens, eos)
            turns.append((ids, plain))
            plain_tokens, plain_seconds = plain_tokens + p.new_tokens, plain_seconds + p.seconds
            messages.append({"role": "assistant", "content": tok.decode(plain, skip_special_tokens=True)})
    plain_tps = plain_tokens / max(plain_seconds, 1e-9)
    # The estimate replays greedy rounds over the plain text: exact for greedy decoding, not a figure of sampling.
    sampled = b.temperature > 0
    matches = [] if sampled else [match_lengths(static, draft, ids + plain, b.sweep_max_steps) for ids, plain in turns]
    estimates = {}
    for steps in range(1, 0 if sampled else b.sweep_max_steps + 1):
        lens = [a for (ids, plain), m in zip(turns, matches)
                for a in chain_accept_lengths(m, len(ids), len(plain), steps)]
        estimates[steps] = sum(lens) / max(1, len(lens))
    rows = []
    for steps, topk, tokens in settings:
        dec = decoder(steps, topk, tokens)
        warm_up(dec, tok, b.capture_ahead)
        lens, new, seconds, differing = [], 0, 0.0, 0
        for ids, plain in tqdm(turns, desc=f"sweep: S={steps} k={topk} T={tokens}", unit="turn",
                               **({} if main else {"disable": True})):
            spec, s = dec.generate(ids, b.max_new_tokens, eos)
            lens += s.accept_lengths
            new, seconds, differing = new + s.new_tokens, seconds + s.seconds, differing + (spec != plain)
        tps = new / max(seconds, 1e-9)
        rows.append({"spec_steps": steps, "topk": topk, "num_draft_tokens": tokens,
                     "accept_length": sum(lens) / max(1, len(lens)),
                     "estimated_accept_length": estimates.get(steps) if topk == 1 else None,
                     "accept_rate_by_position": position_rates(lens, steps),
                     # What a round costs in the run itself (its replays and the host's work between them), to
                     # set beside the replay-alone figures of scripts/bench_decode.py.
                     "ms_per_round": 1000 * seconds / max(1, len(lens)),
                     "spec_tokens_per_s": tps, "speedup": tps / plain_tps, "outputs_differing": differing})
    best = max(rows, key=lambda r: r["spec_tokens_per_s"])
    best_chain = max((r for r in rows if r["topk"] == 1), key=lambda r: r["spec_tokens_per_s"], default=None)
    return {"turns": len(turns), "plain_tokens_per_s": plain_tps, "estimated_chain_accept_length": estimates,
            "rows": rows, "best": best, "best_chain": best_chain}


def serve_flags(draft_dir, best: dict, best_chain: Optional[dict]) -> list[str]:
    """The SGLang and vLLM settings of the fastest setting (vLLM: its fastest chain)."""
    lines = [f"SGLang: --speculative-algorithm EAGLE3 --speculative-draft-model-path {draft_dir} "
             f"--speculative-num-steps {best['spec_steps']} --speculative-eagle-topk {best['topk']} "
             f"--speculative-num-draft-tokens {best['num_draft_tokens']}"]
    if best_chain is not None:  # vLLM reads the speculators layout (`train.export_format=both` writes it beside)
        vllm_dir = Path(draft_dir).with_name(Path(draft_dir).name + "-speculators")
        conf = json.dumps({"method": "eagle3", "model": str(vllm_dir if vllm_dir.is_dir() else draft_dir),
                           "num_speculative_tokens": best_chain["spec_steps"]})
        lines.append(f"vLLM: --speculative-config '{conf}'")
    return lines


def sweep_table(results: dict) -> str:
    lines = ["| setting | accept length | estimated (one unroll) | accept rate, positions 1..S | ms per round | "
             "spec tok/s | speedup | outputs differing |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        name = (f"chain S={r['spec_steps']}" if r["topk"] == 1 else
                f"tree S={r['spec_steps']}, topk {r['topk']}, T={r['num_draft_tokens']}")
        est = "" if r["estimated_accept_length"] is None else f"{r['estimated_accept_length']:.2f}"
        rates = " ".join(f"{x:.2f}" for x in r["accept_rate_by_position"])
        lines.append(f"| {name} | {r['accept_length']:.2f} | {est} | {rates} | {r['ms_per_round']:.3f} | "
                     f"{r['spec_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['outputs_differing']} of "
                     f"{results['turns']} |")
    est = " ".join(f"S={k}: {v:.2f}" for k, v in results["estimated_chain_accept_length"].items())
    lines += ["", f"plain decoding: {results['plain_tokens_per_s']:.1f} tok/s",
              f"estimated chain acceptance: {est or 'none (sampling: the estimate replays greedy rounds)'}"]
    return "\n".join(lines)


def write_sweep(results: dict, out: Path, draft_dir) -> None:
    flags = serve_flags(draft_dir, results["best"], results["best_chain"])
    text = sweep_table(results) + "\n\nfastest:\n" + "\n".join(flags)
    write_text(out / "sweep.json", json.dumps({**results, "serve_flags": flags}, indent=2))
    write_text(out / "sweep.md", text + "\n")
    print(text)
    print(f"bench: wrote {out}/sweep.json, sweep.md")


def summarize(rows: list[dict], steps: int) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[r["category"]].append(r)
        groups["overall"].append(r)
    out = {}
    for name, rs in sorted(groups.items(), key=lambda kv: (kv[0] == "overall", kv[0])):
        lens = [a for r in rs for a in r["accept_lengths"]]
        rounds = max(1, len(lens))
        g = {
            "turns": len(rs),
            "rounds": len(lens),
            "accept_length": sum(lens) / rounds,
            "accept_rate_by_position": position_rates(lens, steps),
            "spec_tokens_per_s": sum(r["new_tokens"] for r in rs) / max(1e-9, sum(r["spec_seconds"] for r in rs)),
        }
        if "plain_seconds" in rs[0]:
            plain_s = sum(r["plain_seconds"] for r in rs)
            g["plain_tokens_per_s"] = sum(r["plain_tokens"] for r in rs) / max(1e-9, plain_s)
            g["speedup"] = g["spec_tokens_per_s"] / g["plain_tokens_per_s"]
            g["outputs_differing"] = sum(1 for r in rs if not r["identical"])
        out[name] = g
    return {"by_category": out, "accept_length_histogram": _histogram([a for r in rows for a in r["accept_lengths"]])}


def _histogram(lens: list[int]) -> dict:
    h = defaultdict(int)
    for a in lens:
        h[a] += 1
    return {str(k): h[k] for k in sorted(h)}


def markdown_table(results: dict) -> str:
    cats = results["by_category"]
    has_plain = "speedup" in next(iter(cats.values()))
    head = "| category | turns | accept length | accept rate by position | spec tok/s |"
    sep = "|---|---|---|---|---|"
    if has_plain:
        head += " plain tok/s | speedup | outputs differing |"
        sep += "---|---|---|"
    lines = [head, sep]
    for name, g in cats.items():
        rates = " ".join(f"{x:.2f}" for x in g["accept_rate_by_position"])
        line = f"| {name} | {g['turns']} | {g['accept_length']:.2f} | {rates} | {g['spec_tokens_per_s']:.1f} |"
        if has_plain:
            line += f" {g['plain_tokens_per_s']:.1f} | {g['speedup']:.2f}x | {g['outputs_differing']} |"
        lines.append(line)
    return "\n".join(lines)


def write_reports(results: dict, rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps({**results, "turns": rows}, indent=2))
    s = results["settings"]
    header = (f"# bench: {s['target']}, S={s['spec_steps']}, topk={s['topk']}, T={s['num_draft_tokens']}, "
              f"temperature={s['temperature']}, {s['device']} {s['dtype']}\n\n")
    write_text(out / "results.md", header + markdown_table(results) + "\n")
    plot(results, out / "plot.png")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("bench: plot skipped (matplotlib is not installed: pip install 'specforge[bench]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = results["accept_length_histogram"]
    overall = results["by_category"]["overall"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar([int(k) for k in hist], list(hist.values()), color="#4477aa")
    a.set_xlabel("tokens per target forward (bonus included)")
    a.set_ylabel("rounds")
    a.set_title(f"acceptance length, mean {overall['accept_length']:.2f}")
    rates = overall["accept_rate_by_position"]
    b.bar(range(1, len(rates) + 1), rates, color="#cc6677")
    b.set_ylim(0, 1)
    b.set_xlabel("draft position")
    b.set_ylabel("share of rounds accepted")
    b.set_title("acceptance by draft position")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
