"""Where the time of real decoded turns goes, on a GPU (the gap between `bench_decode.py`'s step costs and
`specforge bench`'s tokens/s).

Decodes the bench prompts' turns as `specforge bench` does (same decoder, same warm-up), speculatively and
plainly, with the device synchronised around the prefills so their time is known; the rest of a turn is its
rounds (or plain blocks). Against those, the round's and the plain block's own graph replayed back to back
(device time): what a turn costs beyond prefill and device time is host time between replays. Prints a
table per phase, the time spent in garbage collections inside the turns, the turns slower than twice the
median round (a capture, a compile or a collection inside a turn), and with `--profile` the host ops of one
turn by self CPU time. `--no-freeze`: without the bench's `gc.freeze()` after warm-up;
`--compiled-prompts`: prompt graphs of the compiled forwards.

  python scripts/profile_turns.py --config configs/recipes/smollm2-gpu.yaml --spec-steps 5 [--topk 4 \
      --num-draft-tokens 16] [--turns 40] [--profile]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from specforge.bench import load_models, warm_up
from specforge.config import load_config
from specforge.data.conversations import bundled_path, read_jsonl
from specforge.data.template import prompt_ids
from specforge.parallel.mesh import init_distributed


def timed(fn, log: list):
    """fn, with the device synchronised before and after and the seconds between appended to log."""
    def wrapper(*a, **k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a, **k)
        torch.cuda.synchronize()
        log.append(time.perf_counter() - t0)
        return out
    return wrapper


def replay_ms(call, iters: int = 50) -> float:
    """Device time of a captured graph replayed back to back (its inputs as they are)."""
    call.graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        call.graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--spec-steps", type=int, default=5)
    ap.add_argument("--topk", type=int, default=1)
    ap.add_argument("--num-draft-tokens", type=int, default=None)
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--profile", action="store_true", help="torch.profiler over one speculative turn")
    ap.add_argument("--no-freeze", action="store_true", help="undo warm-up's gc.freeze()")
    ap.add_argument("--compiled-prompts", action="store_true",
                    help="the prompt graphs replay the compiled forwards (SpecDecoder.prompt_compiled)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()
    cfg = load_config(config_file=args.config, overrides=args.overrides)
    tokens = args.num_draft_tokens or args.spec_steps + 1
    models = load_models(cfg, init_distributed(cfg), [(args.spec_steps, args.topk, tokens)])
    dec, tok = models.decoder(args.spec_steps, args.topk, tokens), models.tok
    dec.prompt_compiled = args.compiled_prompts
    t0 = time.perf_counter()
    warm_up(dec, tok, cfg.bench.capture_ahead)
    print(f"warm-up: {time.perf_counter() - t0:.1f} s, {len(dec._graphs)} graphs "
          f"({sum(k[0] in ('prompt', 'draft_prompt') for k in dec._graphs)} of prompts), "
          f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved")
    if args.no_freeze:
        gc.unfreeze()
    graphs_before = len(dec._graphs)
    collections = []  # (generation, seconds) of every garbage collection from here on
    started = {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            collections.append((info["generation"], time.perf_counter() - started["t"]))

    gc.callbacks.append(on_gc)
    prefills, draft_prefills = [], []
    dec._prefill = timed(dec._prefill, prefills)
    dec._draft_prefill = timed(dec._draft_prefill, draft_prefills)
    turns = []
    for conv in read_jsonl(cfg.bench.prompts or bundled_path("bench_prompts.jsonl")):
        messages = [m for m in conv.messages if m["role"] == "system"]
        for text in conv.user_turns():
            if len(turns) == args.turns:
                break
            messages.append({"role": "user", "content": text})
            ids = prompt_ids(tok, messages)
            before = len(collections)
            spec, s = dec.generate(ids, cfg.bench.max_new_tokens, tok.eos_token_id)
            spec_gc, before = sum(t for _, t in collections[before:]), len(collections)
            spec_prefill, spec_draft = prefills.pop(), draft_prefills.pop()
            plain, p = dec.generate_plain(ids, cfg.bench.max_new_tokens, tok.eos_token_id)
            turns.append({"prompt": len(ids), "rounds": len(s.accept_lengths), "new": s.new_tokens,
                          "spec": s.seconds, "prefill": spec_prefill, "draft_prefill": spec_draft, "spec_gc": spec_gc,
                          "plain": p.seconds, "plain_prefill": prefills.pop(), "plain_new": p.new_tokens,
                          "plain_gc": sum(t for _, t in collections[before:])})
            messages.append({"role": "assistant", "content": tok.decode(spec, skip_special_tokens=True)})
    rounds = [k for k in dec._graphs if k[0] == "round"]
    blocks = [k for k in dec._graphs if k[0] == "plain" and k[1] == dec.plain_block]
    round_dev = replay_ms(dec._graphs[rounds[-1]]) if rounds else float("nan")
    block_dev = replay_ms(dec._graphs[blocks[-1]]) / dec.plain_block if blocks else float("nan")

    def ms(x):
        return 1e3 * statistics.median(x)

    per_round = [(t["spec"] - t["prefill"] - t["draft_prefill"]) / t["rounds"] for t in turns]
    per_token = [(t["plain"] - t["plain_prefill"]) / t["plain_new"] for t in turns]
    n_new, n_rounds = sum(t["new"] for t in turns), sum(t["rounds"] for t in turns)
    print(f"\n## {len(turns)} turns, S={args.spec_steps} topk={args.topk} T={tokens}, "
          f"{torch.cuda.get_device_name()}, whole-cache attention: {dec.whole_cache}; "
          f"graphs captured inside the turns: {len(dec._graphs) - graphs_before}")
    print("| phase | median ms | total s |")
    print("|---|---|---|")
    for name, vals in [("spec: target prefill", [t["prefill"] for t in turns]),
                       ("spec: draft prefill", [t["draft_prefill"] for t in turns]),
                       ("spec: per round (rest of the turn / rounds)", per_round),
                       ("plain: target prefill", [t["plain_prefill"] for t in turns]),
                       ("plain: per token (rest of the turn / tokens)", per_token)]:
        print(f"| {name} | {ms(vals):.3f} | {sum(vals) if 'per' not in name else float('nan'):.3f} |")
    print(f"| round graph, device time (back to back) | {round_dev:.3f} | |")
    print(f"| plain block graph per token, device time | {block_dev:.3f} | |")
    spec_s, plain_s = sum(t["spec"] for t in turns), sum(t["plain"] for t in turns)
    spec_tps, plain_tps = n_new / spec_s, sum(t["plain_new"] for t in turns) / plain_s
    print(f"\nacceptance length {n_new / n_rounds:.2f}; spec {spec_tps:.1f} tok/s, plain {plain_tps:.1f} tok/s, "
          f"speedup {spec_tps / plain_tps:.2f}x; host time per round ~ {ms(per_round) - round_dev:.3f} ms, "
          f"per plain token ~ {ms(per_token) - block_dev:.3f} ms")
    full = [t for g, t in collections if g == 2]
    print(f"garbage collections inside the turns: {len(collections)} ({len(full)} full), "
          f"{sum(t['spec_gc'] for t in turns):.3f} s in speculative turns, {sum(t['plain_gc'] for t in turns):.3f} s "
          f"in plain ones; longest {1e3 * max((t for _, t in collections), default=0):.1f} ms")
    slow = [(i, t) for i, t in enumerate(turns) if per_round[i] > 2 * ms(per_round) / 1e3]
    for i, t in slow:
        print(f"slow turn {i}: prompt {t['prompt']}, {t['rounds']} rounds, {1e3 * per_round[i]:.2f} ms per round, "
              f"prefill {1e3 * t['prefill']:.1f} ms, draft prefill {1e3 * t['draft_prefill']:.1f} ms, "
              f"collections {1e3 * t['spec_gc']:.1f} ms")
    worst = sorted(turns, key=lambda t: t["plain"] - t["spec"])[:6]
    print("turns where speculation lost most (prompt, new tokens, spec ms = prefill + draft prefill + rounds + "
          "gc, plain ms = prefill + steps + gc):")
    for t in worst:
        rounds_ms = 1e3 * (t["spec"] - t["prefill"] - t["draft_prefill"]) / t["rounds"]
        steps_ms = 1e3 * (t["plain"] - t["plain_prefill"]) / t["plain_new"]
        print(f"  {t['prompt']}, {t['new']}: spec {1e3 * t['spec']:.1f} = {1e3 * t['prefill']:.1f} + "
              f"{1e3 * t['draft_prefill']:.1f} + {t['rounds']} x {rounds_ms:.2f} (gc {1e3 * t['spec_gc']:.1f}); "
              f"plain {1e3 * t['plain']:.1f} = {1e3 * t['plain_prefill']:.1f} + {t['plain_new']} x {steps_ms:.2f} "
              f"(gc {1e3 * t['plain_gc']:.1f})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        ids = prompt_ids(tok, [{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
        dec.generate(ids, cfg.bench.max_new_tokens, tok.eos_token_id)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            dec.generate(ids, cfg.bench.max_new_tokens, tok.eos_token_id)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
