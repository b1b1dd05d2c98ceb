"""Tokenisation speed: conversations/s from a JSONL file to training samples (chat template, loss masks,
truncation), with the embedded default's tokenizer.

N synthetic multi-turn conversations are built from the bundled prompts with made-up answers of realistic
length (seeded), and written as JSONL. Rows of the table:
- before: the per-conversation loop training used until the map (read_jsonl, then chat template and mask
  one conversation after another in this process), timed on the first --before conversations;
- cold: the same file through open_table + tokenize_table with an empty cache (datasets.map, --num-proc);
- cached: the same command again, which reads the tokenised cache.

  python scripts/bench_tokenize.py --n 100000 --before 5000 --out /tmp/bench-tokenize
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

from specforge.config import DataConfig
from specforge.data.conversations import bundled_path, read_jsonl
from specforge.data.tables import num_proc, open_table
from specforge.data.template import Sample, _ids_and_mask, tokenize_table

FOLLOW_UPS = ["Can you make it shorter?", "Give me an example.", "Why is that?", "Explain the second point in "
              "more detail.", "Now write it as a list.", "What would change for a beginner?", "Thanks. Anything "
              "else I should know?", "Can you translate that into plain language?", "Show the code again with "
              "comments.", "Is there a faster way?"]
OPENERS = ["Sure.", "Here is one way to think about it.", "Good question.", "Certainly!", "Let's go step by step.",
           "In short:", "There are a few parts to this."]


def word_pool() -> list[str]:
    """Words of the bundled prompts, for answers that look like the prompts' language."""
    words = []
    for name in ("train_prompts.jsonl", "bench_prompts.jsonl"):
        for conv in read_jsonl(bundled_path(name)):
            for turn in conv.user_turns():
                words += [w.strip(".,?!:;\"'()").lower() for w in turn.split()]
    return [w for w in words if w.isalpha()]


def answer(rng: random.Random, words: list[str]) -> str:
    """Paragraphs, sometimes a list or a code block; about 40-600 words, median about 150."""
    target = int(min(600, max(40, rng.lognormvariate(5.0, 0.6))))
    parts, n = [rng.choice(OPENERS)], 0
    while n < target:
        kind = rng.random()
        if kind < 0.15:
            items = [" ".join(rng.choices(words, k=rng.randint(4, 10))).capitalize() + "." for _ in
                     range(rng.randint(3, 6))]
            parts.append("\n".join(f"{i + 1}. {t}" for i, t in enumerate(items)))
            n += sum(len(t.split()) for t in items)
        elif kind < 0.22:
            names = rng.choices(words, k=4)
            parts.append(f"```python\ndef {names[0]}_{names[1]}(x):\n    {names[2]} = x * 2\n"
                         f"    return {names[2]} + len('{names[3]}')\n```")
            n += 12
        else:
            sentences = [" ".join(rng.choices(words, k=rng.randint(8, 24))).capitalize() + rng.choice(".!.?.")
                         for _ in range(rng.randint(2, 5))]
            parts.append(" ".join(sentences))
            n += sum(len(s.split()) for s in sentences)
    return "\n\n".join(parts)


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = word_pool()
    prompts = [c.user_turns() for name in ("train_prompts.jsonl", "bench_prompts.jsonl")
               for c in read_jsonl(bundled_path(name))]
    rows = []
    for i in range(n):
        turns = list(rng.choice(prompts))
        extra = rng.choices([0, 1, 2, 3], weights=[60, 25, 10, 5])[0]
        turns = turns[:1 + extra] + [rng.choice(FOLLOW_UPS) for _ in range(1 + extra - len(turns[:1 + extra]))]
        messages = []
        for t in turns:
            messages += [{"role": "user", "content": t}, {"role": "assistant", "content": answer(rng, words)}]
        rows.append({"id": f"bench-{i}", "messages": messages})
    return rows


def before(tok, path: Path, limit: int, max_length: int) -> tuple[float, int]:
    """The per-conversation loop (what tokenize_all did before the map): seconds, and tokens kept."""
    t = time.perf_counter()
    samples = []
    for k, conv in enumerate(read_jsonl(path, need_answer=True)):
        if k == limit:
            break
        ids, mask = _ids_and_mask(tok, conv.messages)
        ids, mask = ids[:max_length], mask[:max_length]
        samples.append(Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), conv.id))
    return time.perf_counter() - t, sum(len(s.input_ids) for s in samples)


def after(tok, path: Path, data: DataConfig) -> tuple[float, float, int]:
    """open_table + tokenize_table: (seconds reading the file, seconds tokenising, tokens kept)."""
    t = time.perf_counter()
    table = open_table(str(path), data, need_answer=True, label="data.train_path")
    t_read = time.perf_counter() - t
    samples = tokenize_table(tok, table, data)
    return t_read, time.perf_counter() - t - t_read, sum(len(s.input_ids) for s in samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="conversations")
    ap.add_argument("--before", type=int, default=5000, help="conversations the per-conversation loop is timed on")
    ap.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: one per core)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--out", default="/tmp/bench-tokenize", help="data file and tokenised cache (emptied first)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from specforge.targets import embedded_smollm2_folder

    tok = AutoTokenizer.from_pretrained(embedded_smollm2_folder())
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    path = out / "conversations.jsonl"
    t = time.perf_counter()
    rows = conversations(args.n)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    turns = sum(len(r["messages"]) // 2 for r in rows) / len(rows)
    print(f"built {args.n} conversations ({turns:.2f} user turns each, {path.stat().st_size / 2**20:.0f} MiB) "
          f"in {time.perf_counter() - t:.1f} s", flush=True)
    del rows
    data = DataConfig(max_length=args.max_length, num_proc=args.num_proc, cache_dir=str(out / "cache"))
    procs = num_proc(data, args.n) or 1

    limit = min(args.before, args.n)
    t_before, tok_before = before(tok, path, limit, args.max_length)
    cold = after(tok, path, data)
    cached = after(tok, path, data)
    print(f"\n{args.n} conversations, max_length {args.max_length}, {cold[2] / args.n:.0f} tokens kept per "
          f"conversation\n")
    print("| run | processes | conversations | read s | tokenise s | total s | conversations/s | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| before: per-conversation loop | 1 | {limit} | | | {t_before:.1f} | {limit / t_before:.0f} | "
          f"{tok_before / t_before:.0f} |")
    for name, (t_read, t_tok, kept) in (("cold: datasets.map, empty cache", cold), ("cached: same command again",
                                                                                    cached)):
        total = t_read + t_tok
        print(f"| {name} | {procs} | {args.n} | {t_read:.1f} | {t_tok:.1f} | {total:.1f} | {args.n / total:.0f} | "
              f"{kept / total:.0f} |")
    if limit < args.n:
        print(f"\nbefore, scaled to {args.n}: {t_before * args.n / limit:.0f} s")


if __name__ == "__main__":
    main()
