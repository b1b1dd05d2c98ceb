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
import resource
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


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the map's pool): on a shared machine the
    wall time depends on the other load, the CPU time much less."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def before(tok, path: Path, limit: int, max_length: int) -> tuple[float, float, list[Sample]]:
    """The per-conversation loop (what tokenize_all did before the map): wall s, CPU s, samples."""
    t, c = time.perf_counter(), cpu_seconds()
    samples = []
    for k, conv in enumerate(read_jsonl(path, need_answer=True)):
        if k == limit:
            break
        ids, mask = _ids_and_mask(tok, conv.messages)
        ids, mask = ids[:max_length], mask[:max_length]
        samples.append(Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), conv.id))
    return time.perf_counter() - t, cpu_seconds() - c, samples


def after(tok, path: Path, data: DataConfig) -> tuple[float, float, float, list[Sample]]:
    """open_table + tokenize_table: wall s reading the file, wall s tokenising, CPU s, samples."""
    t, c = time.perf_counter(), cpu_seconds()
    table = open_table(str(path), data, need_answer=True, label="data.train_path")
    t_read = time.perf_counter() - t
    samples = tokenize_table(tok, table, data)
    return t_read, time.perf_counter() - t - t_read, cpu_seconds() - c, samples


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="conversations")
    ap.add_argument("--before", type=int, default=5000, help="conversations the per-conversation loop is timed on")
    ap.add_argument("--num-proc", default=None,
                    help="data.num_proc, or several (1,2): a cold run for each (default: one per core)")
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

    limit = min(args.before, args.n)
    t_before, c_before, loop = before(tok, path, limit, args.max_length)
    runs = []  # (name, processes, (read s, tokenise s, CPU s, samples))
    for procs in [int(p) for p in args.num_proc.split(",")] if args.num_proc else [None]:
        data = DataConfig(max_length=args.max_length, num_proc=procs, cache_dir=str(out / f"cache-{procs}"))
        runs.append(("cold: datasets.map, empty cache", num_proc(data, args.n) or 1, after(tok, path, data)))
    runs.append(("cached: same command again", runs[-1][1], after(tok, path, data)))
    same = all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
               for _, _, run in runs for a, b in zip(loop, run[3]))
    tokens = sum(len(s.input_ids) for s in runs[0][2][3])
    print(f"\n{args.n} conversations, max_length {args.max_length}, {tokens / args.n:.0f} tokens kept per "
          f"conversation; the first {limit} identical to the loop's (ids and masks): {same}\n")
    print("| run | processes | conversations | read s | tokenise s | total s | CPU s | conversations/s | "
          "conversations per CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| before: per-conversation loop | 1 | {limit} | | | {t_before:.1f} | {c_before:.1f} | "
          f"{limit / t_before:.0f} | {limit / c_before:.0f} |")
    for name, procs, (t_read, t_tok, cpu, _) in runs:
        total = t_read + t_tok
        print(f"| {name} | {procs} | {args.n} | {t_read:.1f} | {t_tok:.1f} | {total:.1f} | {cpu:.1f} | "
              f"{args.n / total:.0f} | {args.n / cpu:.0f} |")
    if limit < args.n:
        print(f"\nbefore, scaled to {args.n}: {t_before * args.n / limit:.0f} s ({c_before * args.n / limit:.0f} "
              "CPU s)")


if __name__ == "__main__":
    main()
