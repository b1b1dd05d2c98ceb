"""`specforge bench`: what a draft buys at inference, measured on a prompt set.

Every turn is decoded twice with the same target forward: plainly, one token per target step, and
speculatively with the draft. At greedy decoding the two outputs must be identical (it is counted);
acceptance length, per-position acceptance and tokens/s come from the speculative run."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from .config import Config
from .data.conversations import bundled_path, read_jsonl
from .data.template import ensure_chat_template, prompt_ids
from .eagle3.checkpoint import load_draft
from .eagle3.decoder import SpecDecoder
from .kernels.batch_invariant import batch_invariant
from .parallel.mesh import Dist, init_distributed, is_main, launched, shutdown
from .parallel.tensor_parallel import load_target_tp
from .targets import decoder_parts, load_target, text_config


def run_bench(cfg: Config) -> dict:
    with batch_invariant(cfg.bench.deterministic):
        return _run_bench(cfg)


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


def _run_bench(cfg: Config) -> dict:
    b = cfg.bench
    dist = _processes(cfg)
    device, main = dist.device, is_main(dist)
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
    dec = SpecDecoder(target, draft, aux_ids, max_len=b.max_len, spec_steps=b.spec_steps, topk=b.topk,
                      num_draft_tokens=b.num_draft_tokens, temperature=b.temperature, seed=b.seed,
                      cuda_graphs=b.cuda_graphs and dist.tp == 1)  # collectives stay out of graphs
    convs = list(read_jsonl(b.prompts or bundled_path("bench_prompts.jsonl")))[: b.limit]
    eos = tok.eos_token_id
    # Warm-up (allocations, first-call costs) outside the timed runs.
    warm = prompt_ids(tok, [{"role": "user", "content": "Hello"}])
    dec.generate(warm, 8, eos)
    dec.generate_plain(warm, 8, eos)

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
    results["settings"] = {"target": cfg.target.name, "draft": str(draft_dir), "spec_steps": b.spec_steps,
                           "topk": b.topk, "num_draft_tokens": dec.num_draft_tokens,
                           "temperature": b.temperature, "max_new_tokens": b.max_new_tokens,
                           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           "dtype": str(embed.weight.dtype), "cuda_graphs": dec.cuda_graphs,
                           "deterministic": b.deterministic, "tensor_parallel": dist.tp,
                           "prompts": str(b.prompts or "bundled bench_prompts.jsonl")}
    out = Path(b.out) if b.out else cfg.output_dir() / "bench"
    if main:
        write_reports(results, rows, out)
        print(markdown_table(results))
        print(f"bench: wrote {out}/results.json, results.md, plot.png")
    shutdown(dist)
    return results


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
            # Share of rounds whose draft token at position i (1-based) was accepted.
            "accept_rate_by_position": [sum(1 for a in lens if a - 1 >= i) / rounds for i in range(1, steps + 1)],
            "spec_tokens_per_s": sum(r["new_tokens"] for r in rs) / max(1e-9, sum(r["spec_seconds"] for r in rs)),
        }
        if "plain_seconds" in rs[0]:
            g["plain_tokens_per_s"] = sum(r["plain_tokens"] for r in rs) / max(1e-9, sum(r["plain_seconds"] for r in rs))
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
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({**results, "turns": rows}, indent=2))
    tmp.replace(out / "results.json")
    s = results["settings"]
    header = (f"# bench: {s['target']}, S={s['spec_steps']}, topk={s['topk']}, T={s['num_draft_tokens']}, "
              f"temperature={s['temperature']}, {s['device']} {s['dtype']}\n\n")
    (out / "results.md").write_text(header + markdown_table(results) + "\n")
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
