"""Step costs of speculative decoding on a GPU: the numbers that bound its speedup.

Prints one table per target: the target's decode step (1 token over a static KV cache, replayed from a CUDA
graph) against its weight-read floor, the verify steps of S+1 (chain) and T (tree) tokens, the draft's steps, a
whole round (draft prefill, drafting, verification, acceptance, cache moves: what one replay runs per round),
and plain greedy decoding per token in blocks of `--plain-block`. With the theory of eagle3.md, speedup ~
acceptance_length / (1 + S*c + v + prefill), c = draft step / target step, v = verify / decode - 1; the measured
round gives the same bound without the sum: acceptance_length * (plain ms per token) / (round ms). The "turn"
rows time whole greedy turns per round, host reads included, with the next round launched before the last one's
summary is read and without (what the host costs between rounds).

  python scripts/bench_decode.py --shape llama3.1-8b            # random weights of the real shape
  python scripts/bench_decode.py --shape llama4-scout --layers 8  # Scout's layers, fewer of them
  python scripts/bench_decode.py --target smollm2-135m --draft outputs/smollm2-135m/draft
  python scripts/bench_decode.py --shape smollm2-135m --check docs/step_costs.json   # fail if slower than recorded
  python scripts/bench_decode.py --shape smollm2-135m --config configs/recipes/smollm2-gpu.yaml  # the recipe's draft
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from specforge.config import load_config
from specforge.eagle3.checkpoint import load_draft
from specforge.eagle3.decoder import SpecDecoder
from specforge.eagle3.draft import Eagle3Draft, draft_config, init_draft_weights
from specforge.kernels import skinny_linear
from specforge.kernels.batch_invariant import batch_invariant
from specforge.model_shapes import random_target
from specforge import static_target
from specforge.static_target import StaticTarget
from specforge.targets import aux_layer_ids, decoder_parts, load_target, text_config


def time_ms(fn, iters=50, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), iters=20)
    return 2 * x.numel() / (ms / 1e3)


def build(args):
    dev = torch.device("cuda")
    if args.shape:
        target = random_target(args.shape, dev, torch.bfloat16, num_layers=args.layers)
        depth = [f"target.aux_layer_ids=[1,{args.layers // 2},{args.layers - 1}]"] if args.layers else []
        cfg = load_config(args.shape, config_file=args.config, overrides=depth)
        ids = aux_layer_ids(cfg.target, target)
        embed = decoder_parts(target)[0]
        dcfg = draft_config(target.config, cfg.target.draft, embed.weight.shape[0], ids)
        draft = Eagle3Draft(dcfg, embed)
        init_draft_weights(draft, seed=0)
        return args.shape, target, draft.to(dev, torch.bfloat16), ids
    cfg = load_config(args.target, overrides=["device=cuda"])
    target, _ = load_target(cfg.target, dev)
    embed = decoder_parts(target)[0]
    if args.draft is None:  # step costs do not depend on the draft's weights: the preset's sizes, random
        ids = aux_layer_ids(cfg.target, target)
        draft = Eagle3Draft(draft_config(target.config, cfg.target.draft, embed.weight.shape[0], ids), embed)
        init_draft_weights(draft, seed=0)
        return cfg.target.name, target, draft.to(dev, torch.bfloat16), ids
    draft = load_draft(args.draft, embed, dtype=torch.bfloat16, device=dev,
                       num_target_layers=text_config(target.config).num_hidden_layers)
    return cfg.target.name, target, draft, draft.config.eagle_aux_hidden_state_layer_ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default=None)
    ap.add_argument("--layers", type=int, default=None, help="with --shape: fewer layers (llama4-scout fits one GPU)")
    ap.add_argument("--target", default=None)
    ap.add_argument("--draft", default=None, help="with --target: a trained draft (default: random, preset sizes)")
    ap.add_argument("--config", default=None, help="with --shape: a recipe whose draft settings the random draft "
                    "takes (its vocab, EAGLE 3.1's norms), e.g. configs/recipes/smollm2-gpu.yaml")
    ap.add_argument("--spec-steps", type=int, default=5)
    ap.add_argument("--tree", default="4,16", help="topk,num_draft_tokens for the tree rows")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=2048, help="the decoder's max_len (bench.max_len); attention "
                    "reads the filled slots rounded up to the decoder's span_step, not all of them")
    ap.add_argument("--plain-block", type=int, default=4)
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--check", default=None, help="a --json file of recorded figures: exit 1 if a row is slower "
                                                  "than recorded by more than --tolerance")
    ap.add_argument("--tolerance", type=float, default=0.25)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (to see what they buy)")
    ap.add_argument("--no-compile", action="store_true", help="graphs of the uncompiled forwards")
    ap.add_argument("--no-skinny", action="store_true", help="the target's projections on cuBLAS (F.linear) "
                    "instead of the skinny-linear kernel")
    ap.add_argument("--skinny-rows", choices=skinny_linear.ROW_MODES, default=None,
                    help="skinny_linear.ROWS (default: the module's): how the kernel reduces a verify's rows")
    ap.add_argument("--split-programs", type=int, default=None,
                    help="skinny_linear.SPLIT_PROGRAMS (default: the module's): split K until a projection's launch "
                         "has about this many programs (0: never)")
    ap.add_argument("--fuse-norm", type=int, choices=[0, 1], default=None,
                    help="skinny_linear.FUSE_NORM (default: the module's): the residual add and the norm in the "
                         "projection's launch (1) or op by op (0)")
    ap.add_argument("--norm-passes", type=int, choices=[1, 2], default=None,
                    help="skinny_linear.NORM_PASSES (default: the module's), with --fuse-norm 1: HF's roundings in "
                         "two passes over K (2) or one loop scaled by 1/rms at the end (1, bf16)")
    ap.add_argument("--glu", type=int, choices=[0, 1], default=None,
                    help="skinny_linear.GLU_EPILOGUE (default: the module's): the gated MLP's silu(gate) * up in the "
                         "gate/up projection's launch, its rows interleaved (1), or a kernel of its own (0)")
    ap.add_argument("--compile-prologue", type=int, choices=[0, 1], default=None,
                    help="static_target.COMPILE_PROLOGUE (default: the module's): the target's embedding, slot "
                         "positions and rope angles compiled (1) or eager (0)")
    ap.add_argument("--draft-modules", action="store_true", help="the draft's projections as its modules "
                    "(cuBLAS, q/k/v and gate/up apart), not decoding's fused skinny-linear layout")
    ap.add_argument("--profile", action="store_true", help="kernels per step and the costliest, from the profiler")
    ap.add_argument("--deterministic", action="store_true", help="the batch-invariant kernels (bench.deterministic)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampled decoding (the rounds, plain blocks and "
                    "turns sample; the step rows stay greedy)")
    ap.add_argument("--matmul", choices=["decode", "train"], default="decode",
                    help="with --deterministic: the matmul setting (decode: K split; train: wide tiles, no split)")
    args = ap.parse_args()
    if args.skinny_rows:
        skinny_linear.ROWS = args.skinny_rows
    if args.split_programs is not None:
        skinny_linear.SPLIT_PROGRAMS = args.split_programs
    if args.fuse_norm is not None:
        skinny_linear.FUSE_NORM = bool(args.fuse_norm)
    if args.norm_passes is not None:
        skinny_linear.NORM_PASSES = args.norm_passes
    if args.glu is not None:
        skinny_linear.GLU_EPILOGUE = bool(args.glu)
    if args.compile_prologue is not None:
        static_target.COMPILE_PROLOGUE = bool(args.compile_prologue)
    with batch_invariant(args.deterministic, training=args.matmul == "train"):
        rows = step_costs(args)
    if args.check:
        sys.exit(check(rows, args.check, args.tolerance))


def decoder(args, target, draft, ids, topk=1, tokens=None):
    return SpecDecoder(target, draft, ids, max_len=args.max_len, spec_steps=args.spec_steps, topk=topk,
                       num_draft_tokens=tokens, cuda_graphs=not args.eager,
                       compile=not (args.no_compile or args.deterministic), plain_block=args.plain_block,
                       draft_layout=not args.draft_modules, temperature=args.temperature)


def round_call(dec: SpecDecoder, n: int):
    """A replayable round from a fixed state at cache length n (rounds are idempotent for the same state)."""
    w = dec.path_rows
    g = torch.Generator(device="cuda").manual_seed(0)
    state = (torch.tensor([n], device="cuda"),
             torch.randn(w, 3 * dec.draft.config.hidden_size, device="cuda", generator=g).to(dec.dk.dtype),
             torch.randint(0, 1000, (w,), device="cuda", generator=g), torch.tensor([max(1, w // 2)], device="cuda"))
    fn = dec._chain_round if dec.topk == 1 else dec._tree_round
    span = dec._fit(dec.round_slots(n))  # the span a round at this length attends over, as in decoding
    return lambda: dec._run(("round", span), fn, *state, clone=False)


def turn_ms(dec: SpecDecoder, ahead: bool, n: int, tokens: int = 128) -> float:
    """Milliseconds per round of whole turns (host reads and bookkeeping included, the prompt's prefill
    spread over the rounds), from a prompt of n random tokens; the fastest of three turns (the first captures).
    With random weights a round keeps about one token: this times the rounds, not what they buy."""
    dec.rounds_ahead = ahead
    prompt = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        _, stats = dec.generate(prompt, tokens)
        best = min(best, stats.seconds * 1e3 / len(stats.accept_lengths))
    return best


def fill_context(dec: SpecDecoder, n: int) -> None:
    """Real cache contents for the timed steps: the target's and the draft's prefill over n random tokens."""
    prompt = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    _, aux = dec._prefill(prompt)
    dec._draft_prefill(aux[:n - 1], torch.tensor(prompt[1:], device="cuda"), 0, n - 1)


@torch.no_grad()  # as the decoder runs: compiled forwards are inference graphs
def step_costs(args) -> dict:
    name, target, draft, ids = build(args)
    s, n = args.spec_steps, args.context
    k, t_nodes = (int(x) for x in args.tree.split(","))
    bw = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    static = StaticTarget(target, ids, args.max_len + max(t_nodes, s + 1, args.plain_block),
                          skinny=not args.no_skinny)
    dec = decoder(args, static, draft, ids)
    tree = decoder(args, static, draft, ids, topk=k, tokens=t_nodes)
    fill_context(dec, n)
    dev = dec.device
    rows = {}

    def target_step(d, tokens):
        toks = torch.randint(0, 1000, (tokens,), device=dev)
        pos = n + torch.arange(tokens, device=dev)
        d._fit(d.round_slots(n))
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=dev).tril()
        return lambda: d._target(toks, pos, pos, pos[:1], causal)

    hid = torch.randn(1, draft.config.hidden_size, device=dev, dtype=torch.bfloat16)

    def draft_step(d, rows_, whole=True):
        """One draft step over `rows_` rows with lm_head and argmax (chain) or log-softmax + top-k (tree); with
        `whole=False` only the layer is in the graph and the rest runs eagerly (the earlier measurement)."""
        toks = torch.randint(0, 1000, (rows_,), device=dev)
        pos = torch.full((rows_,), n, device=dev)
        slots = n + torch.arange(rows_, device=dev)
        d._fit(d.round_slots(n))
        prefix, local = torch.tensor([n + rows_], device=dev), torch.ones(rows_, 1, dtype=torch.bool, device=dev)
        h = hid.expand(rows_, -1)[None]

        def layer(t, h_, p, s_, pre, loc):
            return d._draft(t, h_, p, s_, d._mask(pre, loc))[0]

        def head(out):
            logits = d._logits(out).float()
            return logits.argmax(-1) if rows_ == 1 else torch.log_softmax(logits, -1).topk(k, dim=-1).indices

        if not whole:
            return lambda: head(d._run(("layer only", rows_, d._span), lambda *a: layer(*a),
                                       toks, h, pos, slots, prefix, local))
        return lambda: d._run(("draft_step", rows_, d._span), lambda *a: head(layer(*a)),
                              toks, h, pos, slots, prefix, local, clone=False)

    def plain(d):
        tok, n_t = torch.tensor([5], device=dev), torch.tensor([n], device=dev)
        b = d.plain_block
        span = d._fit(n + b)
        return lambda: d._run(("plain", b, span), lambda t, m: d._plain_steps(t, m, b), tok, n_t, clone=False)

    rows["target decode step (1 token)"] = time_ms(target_step(dec, 1))
    rows[f"target verify, chain (S+1={s + 1} tokens)"] = time_ms(target_step(dec, s + 1))
    rows[f"target verify, tree (T={t_nodes} tokens)"] = time_ms(target_step(tree, t_nodes))
    rows["draft step, chain (1 token + lm_head + argmax)"] = time_ms(draft_step(dec, 1))
    rows[f"draft step, tree ({k} tokens + lm_head + top-k)"] = time_ms(draft_step(tree, k))
    if not args.eager:
        rows["draft step, chain, layer in the graph, head eager"] = time_ms(draft_step(dec, 1, whole=False))
    pend = dec.path_rows
    aux = torch.randn(pend, 3 * draft.config.hidden_size, device=dev, dtype=torch.bfloat16)
    toks = torch.randint(0, 1000, (pend,), device=dev)
    dec._fit(dec.round_slots(n))
    rows[f"draft prefill of accepted tokens ({pend})"] = time_ms(
        lambda: dec._draft_prefill(aux, toks, n - pend, n))
    rows[f"plain decoding, per token (blocks of {dec.plain_block})"] = time_ms(plain(dec)) / dec.plain_block
    rows[f"round, chain S={s} (one replay)"] = time_ms(round_call(dec, n))
    rows[f"round, tree S={s} topk {k} T={t_nodes} (one replay)"] = time_ms(round_call(tree, n))
    if not args.eager:
        for d, kind in ((dec, f"chain S={s}"), (tree, f"tree S={s} topk {k} T={t_nodes}")):
            for ahead, how in ((False, "each round read first"), (True, "one round ahead")):
                rows[f"turn, {kind}, per round ({how})"] = turn_ms(d, ahead, n)
    floor = weight_bytes / bw * 1e3
    dec_ms = rows["target decode step (1 token)"]
    plain_ms = rows[f"plain decoding, per token (blocks of {dec.plain_block})"]
    c = rows["draft step, chain (1 token + lm_head + argmax)"] / dec_ms
    v = rows[f"target verify, chain (S+1={s + 1} tokens)"] / dec_ms - 1
    prefill = rows[f"draft prefill of accepted tokens ({pend})"] / dec_ms
    chain_round = rows[f"round, chain S={s} (one replay)"]
    tree_round = rows[f"round, tree S={s} topk {k} T={t_nodes} (one replay)"]
    mode = ("eager" if args.eager else "CUDA graphs") + ("" if args.no_compile or args.deterministic else
                                                          ", torch.compile") + \
        (f", deterministic switch on ({args.matmul} matmul setting)" if args.deterministic else "") + \
        (", draft projections as modules" if args.draft_modules else "") + \
        (f", sampled at T={args.temperature}" if args.temperature > 0 else "") + \
        (f", draft settings of {args.config}" if args.config and args.shape else "")
    print(f"\n## {name}: {torch.cuda.get_device_name()}, bf16, context {n}, {mode}")
    print(f"weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bw / 1e12:.2f} TB/s, weight-read floor {floor:.3f} ms")
    print("| step | ms | vs decode step |")
    print("|---|---|---|")
    for key, ms in rows.items():
        print(f"| {key} | {ms:.3f} | {ms / dec_ms:.2f} |")
    print(f"| weight-read floor of the decode step | {floor:.3f} | {floor / dec_ms:.2f} |")
    print(f"\nc = {c:.3f}, v = {v:.3f}, draft prefill = {prefill:.3f} decode steps; "
          f"decode step = {dec_ms / floor:.2f}x the weight-read floor; "
          f"chain round = {chain_round / dec_ms:.2f} decode steps (1 + S*c + v + prefill = "
          f"{1 + s * c + v + prefill:.2f})")
    for al in (2.0, 2.5, 3.0, 4.0):
        print(f"speedup bound at acceptance length {al}: {al / (1 + s * c + v + prefill):.2f}x by the formula, "
              f"{al * plain_ms / chain_round:.2f}x by the measured chain round against plain decoding, "
              f"{al * plain_ms / tree_round:.2f}x by the tree round")
    if args.profile:
        profile(dec, draft_step(dec, 1), target_step(dec, 1), round_call(dec, n))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"name": name, "device": torch.cuda.get_device_name(), "mode": mode, "rows": rows,
                       "floor_ms": floor, "c": c, "v": v, "prefill": prefill, "bandwidth": bw}, f, indent=2)
    return {"name": name, "device": torch.cuda.get_device_name(), "mode": mode, "rows": rows}


def profile(dec, draft_fn, target_fn, round_fn, reps: int = 10) -> None:
    """Kernels launched per replay of each graph, and where their time goes (CUPTI sees inside graphs)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for label, fn in (("draft step, chain", draft_fn), ("target decode step", target_fn), ("chain round", round_fn)):
        fn()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.count > 0]
        count = sum(e.count for e in kernels) / reps
        total = sum(e.device_time_total for e in kernels) / reps
        print(f"\n### {label}: {count:.0f} kernels per replay, {total / 1e3:.3f} ms of kernel time")
        for e in sorted(kernels, key=lambda e: -e.device_time_total)[:8]:
            print(f"- {e.count / reps:.0f} x {e.key[:90]}: {e.device_time_total / reps / 1e3:.3f} ms")


def check(rows: dict, path: str, tolerance: float) -> int:
    """0 if no step is slower than the recorded figure (same name and mode; the record of the same card where
    there is one, since H100 and H200 steps differ by up to a fifth) by more than `tolerance`."""
    with open(path) as f:
        recorded = json.load(f)
    same = [r for r in recorded if r["name"] == rows["name"] and r["mode"] == rows["mode"]]
    want = next((r for r in same if r.get("device") == rows.get("device")), same[0] if same else None)
    if want is None:
        print(f"check: no figures recorded in {path} for {rows['name']} ({rows['mode']})")
        return 1
    slow = [f"{k}: {ms:.3f} ms, recorded {want['rows'][k]:.3f}" for k, ms in rows["rows"].items()
            if k in want["rows"] and ms > want["rows"][k] * (1 + tolerance)]
    print(f"check against {path} ({want.get('date', '')}, {want.get('device', '')}): "
          + ("ok" if not slow else "SLOWER than recorded: " + "; ".join(slow)))
    return 1 if slow else 0


if __name__ == "__main__":
    main()
