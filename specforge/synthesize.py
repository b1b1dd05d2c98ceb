"""Prompts written by the target itself (the Magpie method, Xu et al. 2024): an aligned chat model given its
chat template up to the start of a user turn writes a plausible user request. A draft learns best from the
target's own distribution, and no dataset is needed.

The template is rendered around a sentinel user message and cut at the sentinel, so any chat template works
(and a default system prompt the template adds stays in). Requests are sampled, one seed per request, and
filtered: too short, cut off at the length limit, empty, or a duplicate of one kept before (exact after
normalising, or near: see NearDuplicates). More are written until N distinct ones are kept; the first N in
request order are the result, so the set depends only on the seed and settings, not on batching."""

from __future__ import annotations

import math
import re
import unicodedata
import zlib

import numpy as np

from .config import PrepareConfig
from .data.conversations import Conversation
from .data.template import prompt_ids
from .generate import Request, generate, request_key, stop_ids
from .log import say

SENTINEL = "\u2063SYNTH-SENTINEL\u2063"


def user_prefix(tokenizer, history: list[dict]) -> list[int]:
    """Tokens of the conversation so far followed by the header of a user turn (no text yet)."""
    text = tokenizer.apply_chat_template(history + [{"role": "user", "content": SENTINEL}], tokenize=False)
    if SENTINEL not in text:
        raise SystemExit("prepare.synthesize: the chat template does not render the user's message text")
    return tokenizer(text[:text.index(SENTINEL)], add_special_tokens=False)["input_ids"]


def normalise(text: str) -> list[str]:
    """Words of a text, compared case- and punctuation-blind."""
    return re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).lower()).split()


def shingles(words: list[str], n: int = 3) -> set[str]:
    """Word n-grams (a text of fewer than n words is one shingle)."""
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicates:
    """Keeps a text unless it equals a kept one after normalising, or its word 3-gram Jaccard similarity to a
    kept one is at least `threshold`. Candidates come from MinHash LSH (72 hashes in 24 bands of 3: a pair at
    Jaccard 0.6 shares a band with probability 0.997, higher above) and are confirmed exactly, so nothing is
    dropped wrongly; the cost per text is 72 hashes of its shingles plus the few candidates it meets, cheap
    enough for 100K prompts."""

    BANDS, ROWS = 24, 3

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.seeds = np.random.default_rng(0).integers(0, 1 << 63, self.BANDS * self.ROWS, dtype=np.uint64)
        self.exact: set[str] = set()
        self.kept: list[set[str]] = []
        self.buckets: dict[tuple, list[int]] = {}

    def _bands(self, sh: set[str]) -> list[tuple]:
        """MinHash signature in bands: per seed, the least of a 64-bit mix (splitmix64's finaliser, uint64
        arithmetic wrapping by design) of each shingle's stable hash xor the seed."""
        x = np.array([zlib.crc32(s.encode("utf-8")) for s in sh], dtype=np.uint64)
        z = self.seeds[:, None] ^ x[None, :]
        with np.errstate(over="ignore"):
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        sig = (z ^ (z >> np.uint64(31))).min(axis=1)
        r = self.ROWS
        return [(band, *sig[band * r:(band + 1) * r].tolist()) for band in range(self.BANDS)]

    def add(self, text: str) -> bool:
        """True (and remembered) when the text is new, False for an exact or near duplicate."""
        words = normalise(text)
        key = " ".join(words)
        if key in self.exact:
            return False
        sh = shingles(words)
        bands = self._bands(sh)
        seen = {i for band in bands for i in self.buckets.get(band, ())}
        if any(jaccard(sh, self.kept[i]) >= self.threshold for i in sorted(seen)):
            return False
        self.exact.add(key)
        for band in bands:
            self.buckets.setdefault(band, []).append(len(self.kept))
        self.kept.append(sh)
        return True


def synthesize(model, tokenizer, pc: PrepareConfig, n: int, pad_id: int) -> list[Conversation]:
    """n distinct user requests written by the target (with pc.synth_turns=2, each followed by the target's
    greedy answer and a second request it writes too; the answers are not kept: prepare-data answers again)."""
    stop = stop_ids(tokenizer, model)
    prefix = user_prefix(tokenizer, [])
    dedup = NearDuplicates(pc.synth_max_similarity)
    texts: list[str] = []
    asked = rounds = 0
    while len(texts) < n:
        # Ask for what is missing, scaled by the share kept so far (at least a quarter more).
        share = len(texts) / asked if asked else 0.8
        count = max(8, math.ceil((n - len(texts)) / max(share, 0.05) * 1.25))
        reqs = [Request(prefix, pc.synth_temperature, request_key("synth", 0, r)) for r in range(asked, asked + count)]
        added = 0
        for g in _run(model, reqs, pc, pc.synth_max_tokens, stop, pad_id, "synthesizing"):
            text = _usable(tokenizer, g, pc)
            if text is not None and dedup.add(text):
                texts.append(text)
                added += 1
        asked, rounds = asked + count, rounds + 1
        say(f"synthesize: {len(texts)} distinct requests of {asked} written")
        if added == 0 or rounds >= 20:
            say(f"synthesize: stopping at {len(texts)} of {n} distinct requests (the target repeats itself)")
            break
    texts = texts[:n]
    convs = [Conversation(messages=[{"role": "user", "content": t}], id=f"synth-{i:06d}", category="synthesized")
             for i, t in enumerate(texts)]
    if pc.synth_turns == 2:
        _second_turns(model, tokenizer, pc, convs, stop, pad_id, dedup)
    return convs


def _run(model, reqs, pc: PrepareConfig, max_new_tokens: int, stop, pad_id: int, desc: str):
    return generate(model, reqs, max_new_tokens, stop, pad_id, seed=pc.seed, batch_size=pc.batch_size,
                    prefill_tokens=pc.prefill_tokens, sync_every=pc.sync_every, cuda_graphs=pc.cuda_graphs, desc=desc)


def _usable(tokenizer, g, pc: PrepareConfig):
    """The request's text, or None when it was cut off, is too short or is empty."""
    if not g.stopped or len(g.tokens) < pc.synth_min_tokens:
        return None
    text = tokenizer.decode(g.tokens, skip_special_tokens=True).strip()
    return text or None


def _second_turns(model, tokenizer, pc: PrepareConfig, convs, stop, pad_id: int, dedup: NearDuplicates) -> None:
    """Append a second request to each conversation: the target answers the first one greedily, then writes
    the user's follow-up. A follow-up that fails the filters is left out (the conversation stays single-turn)."""
    answers = _run(model, [Request(prompt_ids(tokenizer, c.messages)) for c in convs], pc, pc.max_new_tokens,
                   stop, pad_id, "synthesizing: answers")
    reqs = []
    for i, (c, a) in enumerate(zip(convs, answers)):
        history = c.messages + [{"role": "assistant",
                                 "content": (tokenizer.decode(a.tokens, skip_special_tokens=True).strip()
                                             or "(no answer)")}]
        reqs.append(Request(user_prefix(tokenizer, history), pc.synth_temperature, request_key("synth", 1, i)))
    for c, g in zip(convs, _run(model, reqs, pc, pc.synth_max_tokens, stop, pad_id, "synthesizing: follow-ups")):
        text = _usable(tokenizer, g, pc)
        if text is not None and dedup.add(text):
            c.messages.append({"role": "user", "content": text})
