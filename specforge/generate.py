"""Batched generation over the target's static KV cache: the answers of `prepare-data` and the user requests
the target writes for it.

A batch's prompts are left padded into one block: column c is cache slot c in every row, each row counts its
positions from its own first token, and its mask leaves its padding out. After the prompts' prefill, every
step is one forward of one token per row; on a GPU it replays from a CUDA graph, and the host reads back only
every `sync_every` steps whether all rows have stopped (the generated tokens stay on the device until then).

Sampling is Gumbel-max: argmax(logits / T + g), with g drawn from a counter-based hash of (seed, request key,
step, token) computed on the device. So the draw is capturable in a graph, needs no generator state, and a
request's tokens do not depend on the batch it lands in or on the other requests: the same seed and key give
the same tokens on the same device and settings (on the CPU in float32 exactly; in bf16 on a GPU, a forward's
rounding can change with the batch shape)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from .graphs import CapturedCall
from .static_target import StaticTarget
from .targets import decoder_parts, text_config

MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 tensors never overflow.
MUL_A, MUL_B = 0x45D9F3B, 0x2C1B3C6D


@dataclass
class Request:
    prompt: list[int]
    temperature: float = 0.0  # 0: greedy
    key: int = 0  # the request's identity in the sampling noise (see request_key)


@dataclass
class Generated:
    tokens: list[int]  # without the stop token
    stopped: bool  # False: cut at max_new_tokens


def request_key(*parts) -> int:
    """A stable 62-bit key for a request from what identifies it (e.g. "answer", conversation id, sample, turn)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def mix32(x: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds, a bijection), elementwise on int64 tensors holding
    values below 2**32. In place after the first op (the input is left alone): [B, V] tensors are large."""
    x = x ^ (x >> 16)
    for r in range(rounds):
        if r:
            x ^= x >> 16
        x.mul_(MUL_A if r % 2 == 0 else MUL_B).bitwise_and_(MASK32)
    x ^= x >> 15
    return x


def row_seeds(seed: int, keys: list[int]) -> torch.Tensor:
    """Per request: a 32-bit value from (seed, key), the root of all its noise."""
    out = []
    for k in keys:
        digest = hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=4).digest()
        out.append(int.from_bytes(digest, "little"))
    return torch.tensor(out, dtype=torch.long)


def uniform_noise(rows: torch.Tensor, step: torch.Tensor, token_hash: torch.Tensor) -> torch.Tensor:
    """Uniform noise [B, V] in (0, 1) for rows' seeds [B] at generated-token index `step` ([1]); `token_hash`
    [V] is mix32 of the token ids. Uniforms carry 24 bits, so they are exact in float32."""
    at_step = mix32(rows ^ mix32((step + 0x9E3779B9) & MASK32))
    x = mix32(at_step[:, None] ^ token_hash[None, :], rounds=2)  # both inputs well mixed: two rounds suffice
    x >>= 8
    return x.float().add_(0.5).mul_(1.0 / (1 << 24))


def gumbel_noise(rows: torch.Tensor, step: torch.Tensor, token_hash: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [B, V]: -log(-log(u)) of `uniform_noise`."""
    return uniform_noise(rows, step, token_hash).log_().neg_().log_().neg_()


def pick(logits: torch.Tensor, temperature: Optional[torch.Tensor], rows: torch.Tensor, step: torch.Tensor,
         token_hash: torch.Tensor) -> torch.Tensor:
    """Next tokens [B] from float logits [B, V]: argmax, or where a row's temperature is above 0 a sample from
    softmax(logits / T) (Gumbel-max). `temperature` None: every row greedy (no noise computed)."""
    if temperature is None:
        return logits.argmax(-1)
    scores = gumbel_noise(rows, step, token_hash).add_(logits / temperature.clamp(min=1e-6)[:, None])
    return torch.where((temperature > 0)[:, None], scores, logits).argmax(-1)


def stop_ids(tokenizer, model=None) -> list[int]:
    """Tokens that end a turn: the tokenizer's and the model's EOS ids, and the first token the chat template
    puts after a message's text (its end-of-turn marker), found by rendering a message around a sentinel."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    sentinel = "\u2063SENTINEL\u2063"
    for messages in ([{"role": "user", "content": sentinel}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sentinel}]):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        after = text[text.rindex(sentinel) + len(sentinel):]
        if after:
            tail = tokenizer(after, add_special_tokens=False)["input_ids"]
            if tail:
                ids.add(int(tail[0]))
    return sorted(ids)


def _device(model) -> torch.device:
    p = next(model.parameters())
    return (p.to_local() if hasattr(p, "to_local") else p).device


def tensor_parallel(model) -> bool:
    """True for a target split over processes (DTensor weights, or plain local shards): its forward holds
    collectives, which must stay out of CUDA graphs."""
    return any(hasattr(p, "to_local") for p in model.parameters()) or any(
        hasattr(m, "_tp_plain_shards") for m in model.modules())


def auto_batch_size(model, max_len: int, device: torch.device, vocab: int, cap: int = 1024) -> int:
    """32 on the CPU; on a GPU as many rows (at most `cap`) as a quarter of the free memory holds with their KV
    cache of `max_len` slots and their logits and noise ([V] floats and ints, a few of each)."""
    if device.type != "cuda":
        return 32
    cfg = text_config(model.config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    size = next(model.parameters()).element_size()
    per_row = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * max_len * size + vocab * 40)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int(free * 0.25) // per_row))


class BatchRunner:
    """A static cache of `batch` rows and `max_len` slots, and the step that extends every row by one token;
    reused by every batch of the same shape (one CUDA graph per shape and greedy/sampled)."""

    def __init__(self, model, batch: int, max_len: int, max_new_tokens: int, stop: list[int], pad_id: int,
                 cuda_graphs: bool, cache_round: int = 64):
        self.target = StaticTarget(model, [0], max_len, batch)
        self.batch, self.max_len, self.max_new_tokens = batch, max_len, max_new_tokens
        dev = self.target.k_cache.device
        self.device = dev
        self.cuda_graphs = cuda_graphs and dev.type == "cuda"
        # A step attends over the filled slots rounded up to a multiple of span_step, not the whole cache: in
        # `cache_round` steps, or with CUDA graphs (one per span) in four spans at most, as each graph keeps
        # its own memory for the step's temporaries.
        spans = 4 if self.cuda_graphs else max_len // cache_round
        self.span_step = _round(-(-max_len // spans), cache_round)
        self._graphs: dict = {}
        # Persistent tensors the step reads (a captured graph reads these very buffers on every replay).
        self.cols = torch.arange(max_len, device=dev)
        self.start = torch.zeros(batch, dtype=torch.long, device=dev)  # each row's first real column
        self.first = torch.zeros(1, dtype=torch.long, device=dev)  # the prompt's last column
        self.temperature = torch.zeros(batch, dtype=torch.float32, device=dev)
        self.rows = torch.zeros(batch, dtype=torch.long, device=dev)
        self.out = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=dev)
        self.stop = torch.tensor(stop, dtype=torch.long, device=dev)
        self.pad_id = pad_id
        self.pad = torch.tensor(pad_id, dtype=torch.long, device=dev)
        vocab = self.target.lm_head.weight.shape[0]
        self.token_hash = mix32(torch.arange(vocab, dtype=torch.long, device=dev))

    def _step(self, sampled: bool, span: int):
        cols = self.cols[:span]

        def step(tok, n, done):
            pos = n - self.start
            mask = (cols[None, :] >= self.start[:, None]) & (cols[None, :] <= n)
            logits, _ = self.target(tok[:, None], pos[:, None], n, mask[:, None], features=False)
            k = n - self.first  # the index of the token picked here in the answer
            nxt = pick(logits[:, -1].float(), self.temperature if sampled else None, self.rows, k, self.token_hash)
            nxt = torch.where(done, self.pad, nxt)
            self.out.index_copy_(1, k, nxt[:, None])
            return nxt, n + 1, done | (nxt[:, None] == self.stop[None, :]).any(-1)

        return step

    def _run_step(self, sampled: bool, span: int, state):
        fn = self._step(sampled, span)
        if not self.cuda_graphs:
            return fn(*state)
        call = self._graphs.get((sampled, span))
        if call is None:
            # Capture runs the step (warm-up, then one replay): idempotent, as it writes the same cache slot
            # and output column with the same values that the step itself writes.
            call = self._graphs[(sampled, span)] = CapturedCall(fn, state)
        else:
            call.replay(state)
        return call.outputs

    @torch.no_grad()
    def run(self, requests: list[Request], seed: int, prefill_tokens: int, sync_every: int) -> list[Generated]:
        b = len(requests)
        assert b == self.batch
        lengths = [len(r.prompt) for r in requests]
        p = max(lengths)
        ids = torch.full((b, p), self.pad_id, dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, p - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        ids = ids.to(self.device)
        self.start.copy_(torch.tensor([p - n for n in lengths]))
        self.first.fill_(p - 1)
        self.temperature.copy_(torch.tensor([max(r.temperature, 0.0) for r in requests]))
        self.rows.copy_(row_seeds(seed, [r.key for r in requests]))
        sampled = any(r.temperature > 0 for r in requests)
        # Prefill every prompt column but the last (that one is the first decode step's input), in chunks of
        # columns: the forward computes logits for every position, [rows, columns, V] of them.
        chunk = max(1, prefill_tokens // b)
        for c0 in range(0, p - 1, chunk):
            c1 = min(p - 1, c0 + chunk)
            cols, keys = self.cols[c0:c1], self.cols[None, None, :c1]  # the chunk's queries; the slots it reads
            pos = (cols[None, :] - self.start[:, None]).clamp(min=0)
            # A padding column attends to itself only (its output is never read, but must stay finite).
            mask = ((keys >= self.start[:, None, None]) & (keys <= cols[None, :, None])) | (keys == cols[None, :, None])
            self.target(ids[:, c0:c1], pos, cols, mask, features=False)
        state = (ids[:, -1].contiguous(), self.first.clone(), torch.zeros(b, dtype=torch.bool, device=self.device))
        steps = 0
        for steps in range(1, self.max_new_tokens + 1):
            span = min(self.max_len, _round(p + steps - 1, self.span_step))  # column p-2+steps is written now
            state = self._run_step(sampled, span, state)
            if steps % sync_every == 0 and bool(state[2].all()):  # the only host read while decoding
                break
        out = self.out[:, :steps].tolist()
        stop = set(self.stop.tolist())
        result = []
        for row in out:
            cut = next((j for j, t in enumerate(row) if t in stop), None)
            result.append(Generated(row if cut is None else row[:cut], cut is not None))
        return result


@torch.no_grad()
def generate(model, requests: list[Request], max_new_tokens: int, stop: list[int], pad_id: int, seed: int = 0,
             batch_size: Optional[int] = None, cache_round: int = 64, prefill_tokens: int = 16384,
             sync_every: int = 8, cuda_graphs: bool = True, desc: str = "generating") -> list[Generated]:
    """Continue every request's prompt by up to max_new_tokens tokens, stopping a row at any `stop` token.
    Requests are sorted by prompt length so similar lengths share a batch; a batch's cache holds its longest
    prompt plus max_new_tokens, rounded up to `cache_round` slots so that batches can share one cache (and
    its graphs). On the CPU the host checks for stopped rows after every step (it costs nothing there)."""
    if not requests:
        return []
    if not all(r.prompt for r in requests):
        raise ValueError("generate: every request needs a non-empty prompt")
    device = _device(model)
    split = tensor_parallel(model)
    graphs = cuda_graphs and device.type == "cuda" and not split  # collectives stay out of graphs
    every = sync_every if device.type == "cuda" else 1
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
    longest = len(requests[order[-1]].prompt)
    vocab = decoder_parts(model)[3].weight.shape[0]
    if batch_size is None:
        batch_size = auto_batch_size(model, _round(longest + max_new_tokens, cache_round), device, vocab)
    results: list[Optional[Generated]] = [None] * len(requests)
    runner: Optional[BatchRunner] = None
    bar = tqdm(total=len(requests), desc=desc, unit="request")
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        max_len = _round(len(requests[idx[-1]].prompt) + max_new_tokens, cache_round)
        if runner is None or (runner.batch, runner.max_len) != (len(idx), max_len):
            runner = None  # free the last cache and its graphs first
            runner = BatchRunner(model, len(idx), max_len, max_new_tokens, stop, pad_id, graphs, cache_round)
        for i, g in zip(idx, runner.run([requests[i] for i in idx], seed, prefill_tokens, every)):
            results[i] = g
        bar.update(len(idx))
    bar.close()
    return results


def _round(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple
