"""What the deterministic switch buys and costs in decoding (GPU).

For each setting (switch off, then on) and each drafting mode (chain, tree), every prompt is decoded greedily
twice, speculatively and plainly; the table counts the prompts whose outputs differ, the acceptance length,
whether a second pass gives the same acceptance figures, and the tokens/s of both decoders.

  python scripts/bench_deterministic.py --shape llama3.1-8b                 # random weights, random draft
  python scripts/bench_deterministic.py --target smollm2-135m --draft DIR   # the embedded default, bench prompts
"""

from __future__ import annotations

import argparse

import torch

from specforge.config import load_config
from specforge.data.conversations import bundled_path, read_jsonl
from specforge.data.template import prompt_ids
from specforge.eagle3.decoder import SpecDecoder
from specforge.kernels.batch_invariant import batch_invariant

from bench_decode import build


def prompts_for(args, tok, vocab: int) -> list[list[int]]:
    if tok is None:  # random-weight target: random token prompts of varied length
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (int(torch.randint(32, 256, (1,), generator=g)),), generator=g).tolist()
                for _ in range(args.prompts)]
    convs = list(read_jsonl(bundled_path("bench_prompts.jsonl")))[: args.prompts]
    return [prompt_ids(tok, [{"role": "user", "content": c.user_turns()[0]}]) for c in convs]


def run(dec: SpecDecoder, prompts, new_tokens, eos):
    spec_tokens = plain_tokens = spec_s = plain_s = 0.0
    differ, accepts = 0, []
    for p in prompts:
        spec, s = dec.generate(p, new_tokens, eos)
        plain, q = dec.generate_plain(p, new_tokens, eos)
        differ += spec != plain
        accepts.append(tuple(s.accept_lengths))
        spec_tokens, spec_s = spec_tokens + s.new_tokens, spec_s + s.seconds
        plain_tokens, plain_s = plain_tokens + q.new_tokens, plain_s + q.seconds
    return differ, accepts, spec_tokens / spec_s, plain_tokens / plain_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default=None)
    ap.add_argument("--layers", type=int, default=None, help="with --shape: fewer layers")
    ap.add_argument("--target", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--spec-steps", type=int, default=5)
    ap.add_argument("--tree", default="4,16", help="topk,num_draft_tokens of the tree mode")
    args = ap.parse_args()
    name, target, draft, ids = build(args)
    tok = None
    if args.target:
        from specforge.targets import load_tokenizer, target_folder

        tok = load_tokenizer(target_folder(load_config(args.target).target))
    prompts = prompts_for(args, tok, target.config.get_text_config().vocab_size)
    eos = tok.eos_token_id if tok is not None else None
    max_len = max(len(p) for p in prompts) + args.new_tokens + 64
    k, t_nodes = (int(x) for x in args.tree.split(","))
    print(f"\n## {name}: {torch.cuda.get_device_name()}, bf16, CUDA graphs, {len(prompts)} prompts, "
          f"{args.new_tokens} new tokens, greedy, S={args.spec_steps}")
    print("| switch | drafting | prompts differing from plain | accept length | 2nd pass same acceptance | "
          "spec tok/s | plain tok/s |")
    print("|---|---|---|---|---|---|---|")
    for on in (False, True):
        with batch_invariant(on):
            for mode, topk, nodes in (("chain", 1, None), (f"tree k={k} T={t_nodes}", k, t_nodes)):
                dec = SpecDecoder(target, draft, ids, max_len=max_len, spec_steps=args.spec_steps, topk=topk,
                                  num_draft_tokens=nodes, cuda_graphs=True)
                dec.capture_prompts(max(len(p) for p in prompts) + 2)
                dec.generate(prompts[0][:16], 8, eos)  # warm-up: graph capture
                dec.generate_plain(prompts[0][:16], 8, eos)
                differ, accepts, spec_tps, plain_tps = run(dec, prompts, args.new_tokens, eos)
                again = run(dec, prompts, args.new_tokens, eos)[1]
                mean = sum(map(sum, accepts)) / max(1, sum(map(len, accepts)))
                print(f"| {'on' if on else 'off'} | {mode} | {differ} of {len(prompts)} | {mean:.3f} | "
                      f"{'yes' if again == accepts else 'no'} | {spec_tps:.1f} | {plain_tps:.1f} |", flush=True)
                del dec
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
