"""Speculative decoding with an EAGLE-3 draft: chain or tree drafting, greedy or sampled verification.

One round: the draft reads the target features of the tokens accepted last round (its step-0 input, as
in training), proposes a tree of candidate tokens (a chain is the tree with topk=1), the target scores
the whole tree in one forward under an ancestor mask, and the longest path the target agrees with is
kept, plus the target's own next token (the bonus). Rejected entries are dropped from both KV caches by
moving the accepted path's entries into place; the rest lie past the new length and are masked out.

Rounds keep their state on the device (the cache length, the features and tokens the draft has not read
yet), so that a whole round (draft prefill, drafting, verification, acceptance, cache moves) is one function of
fixed shapes: on a GPU one CUDA-graph replay and one host read per round. Plain decoding likewise runs
`plain_block` tokens per replay. Sampling draws its randomness from a hash of (the turn's seed, the position
of the token decided, a lane) on the device, so sampled rounds replay from graphs too, and the host-side
reference path (`_propose`, `_verify`), which the device rounds are tested against, draws exactly the same.
With `compile`, the target and draft forwards inside those graphs are torch.compile'd (fewer, fused kernels
per step).

Plain decoding uses the same target forward one token at a time, so on the CPU in float32 greedy
speculative output equals plain greedy output token for token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..generate import MASK32, gumbel_noise, mix32, row_seeds, uniform_noise
from ..graphs import CapturedCall
from ..layers import SlotMask, cache_mask, grouped_attention, slot_kernel_serves
from ..log import say
from ..static_target import StaticTarget
from .draft import Eagle3Draft


# Sampling's noise lanes: each random choice is a uniform hashed from (the turn's seed, the position of the token it
# decides, its lane, a column: a token id, or a sibling's rank in a tree), never a generator's state. A choice thus
# draws the same whatever the rounds around it, in a graph or on the host.
TARGET_LANE = 0  # a token drawn from the target's distribution (plain decoding, a round's bonus or residual)
DRAFT_LANE = 1  # a chain's draft token drawn from the draft's distribution
ACCEPT_LANE = 2  # the uniform that accepts or rejects a draft token


@dataclass
class DecodeStats:
    new_tokens: int = 0
    target_forwards: int = 0  # after the prompt's prefill
    accept_lengths: list[int] = field(default_factory=list)  # tokens produced per target forward (bonus included)
    seconds: float = 0.0


@dataclass
class Tree:
    tokens: torch.Tensor  # [T] target ids; index 0 is the root (the token the target produced last)
    parents: list[int]  # parent tree index of each node (-1 for the root)
    depths: torch.Tensor  # [T]
    draft_probs: Optional[list[torch.Tensor]] = None  # sampling: q over the draft vocab at each chain depth


class SpecDecoder:
    """Batch size 1. `target_model`: an HF causal LM, or a StaticTarget to share (its cache must hold max_len plus
    a round's tokens). `spec_steps` draft forwards per round; `topk` children per expanded node;
    `num_draft_tokens` tree nodes verified per round (root included; chain: spec_steps + 1).
    `cuda_graphs`: replay rounds and steps from CUDA graphs (on a GPU, when the target's forward is capturable);
    `compile`: torch.compile the target and draft forwards; `plain_block`: tokens per replay in plain
    decoding (one host read per block); `span_step`: where attention takes a dense mask (the CPU, the
    deterministic switch, windowed layers), it reads the filled cache slots rounded up to a multiple of this,
    not the whole cache (with CUDA graphs, one graph per span). On CUDA otherwise (`whole_cache`) every
    decoding forward's mask is a SlotMask that `cache_attention` reads with the filled length on the device,
    and one graph per kind of call serves every length. A prompt's prefill (target and draft) runs padded to
    a multiple of `prompt_step` tokens, from one graph per such length (`capture` takes them all ahead), eagerly
    inside the graph unless `prompt_compiled`."""

    def __init__(self, target_model, draft: Eagle3Draft, aux_layer_ids: list[int], max_len: int = 2048,
                 spec_steps: int = 5, topk: int = 1, num_draft_tokens: Optional[int] = None,
                 temperature: float = 0.0, seed: int = 0, cuda_graphs: bool = False, device_rounds: bool = True,
                 compile: bool = False, plain_block: int = 4, span_step: int = 128, prompt_step: int = 64,
                 draft_layout: bool = True, rounds_ahead: bool = True):
        self.spec_steps, self.topk, self.temperature, self.seed = spec_steps, topk, temperature, seed
        self.num_draft_tokens = num_draft_tokens or spec_steps + 1
        max_nodes = 1 + sum(topk ** d if d == 1 else topk * topk for d in range(1, spec_steps + 1))
        if self.num_draft_tokens > max_nodes:
            raise ValueError(f"num_draft_tokens={self.num_draft_tokens} exceeds the {max_nodes} nodes that "
                             f"spec_steps={spec_steps}, topk={topk} can propose")
        self.max_len = max_len
        slots = max_len + max(self.num_draft_tokens, plain_block)
        if isinstance(target_model, StaticTarget):  # shared by several decoders (a sweep): one cache, one compile
            if target_model.max_len < slots or list(target_model.aux_layer_ids) != list(aux_layer_ids):
                raise ValueError(f"the shared static target has {target_model.max_len} cache slots and aux layers "
                                 f"{target_model.aux_layer_ids}; this decoder needs {slots} and {aux_layer_ids}")
            self.target = target_model
        else:
            self.target = StaticTarget(target_model, aux_layer_ids, slots)
        self.draft = draft
        w = draft.fc.weight
        cfg = draft.config
        self.draft_slots = max_len + spec_steps * topk + 1
        shape = (1, cfg.num_key_value_heads, self.draft_slots, cfg.head_dim)
        self.dk = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.dv = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.device = w.device
        self.draft_ids = draft.target_ids().to(self.device)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        if self.cuda_graphs and not self.target.capturable:
            say("decoder: this target's feed-forward routes tokens through the host (a sparse block of a layout "
                "the static forward does not know), so CUDA graphs cannot capture it: decoding eagerly")
            self.cuda_graphs = False
        self._graphs: dict = {}
        # Rounds (chain or tree, greedy or sampled) keep every token on the device: one host sync per round. The
        # host-side path (`_propose` / `_verify`) is the reference the device rounds are tested against.
        self.device_rounds = device_rounds
        # Sampling's noise (see the lanes above): token and sibling hashes, and the turn's seed, persistent on the
        # device (captured graphs read them).
        self._token_hash = mix32(torch.arange(draft.t2d.numel(), device=self.device))
        self._draft_hash = self._token_hash[self.draft_ids]
        self._sibling_hash = mix32(torch.arange(max(topk, 1), device=self.device))
        self._lanes = torch.arange(3, device=self.device)
        self._vocab = torch.arange(draft.t2d.numel(), device=self.device)
        self._seed_t = torch.zeros(1, dtype=torch.long, device=self.device)
        self.plain_block = max(1, plain_block)
        # Greedy device rounds: launch the next round before reading this one's summary where one graph serves
        # every cache length (`_generate_on_device`).
        self.rounds_ahead = rounds_ahead
        self._stash_bufs: dict = {}
        # Rows of the accepted path a round hands to the next one (the root and the accepted draft tokens).
        self.path_rows = min(spec_steps + 1, self.num_draft_tokens)
        # Slot indices, and the causal masks of a round's rows (corners of one lower triangle): persistent,
        # since captured graphs read them on every replay.
        self._arange = torch.arange(max(self.target.k_cache.shape[3], self.draft_slots), device=self.device)
        rows = max(self.num_draft_tokens, self.path_rows, self.plain_block, spec_steps + 1)
        self._tril = torch.ones(rows, rows, dtype=torch.bool, device=self.device).tril()
        # Where `cache_attention`'s kernel reads every decoding forward's mask as it is (its filled length stays
        # on the device), attention needs no span: one graph per kind of call serves every cache length.
        target_rows = self.target.num_heads // self.target.num_kv_heads * self.num_draft_tokens
        draft_rows = cfg.num_attention_heads // cfg.num_key_value_heads * max(topk, self.path_rows)
        self.whole_cache = self.target.spans_full and slot_kernel_serves(self.device, max(target_rows, draft_rows))
        self.span_step = max(self.target.k_cache.shape[3], self.draft_slots) if self.whole_cache \
            else max(1, span_step)
        self._fit(max(self.target.k_cache.shape[3], self.draft_slots))
        # Prompts: padded to a multiple of prompt_step under CUDA graphs (one graph per padded length, all in one
        # memory pool: one prompt graph runs at a time and its outputs are cloned at once); as they are elsewhere.
        self.prompt_step = max(1, prompt_step) if self.cuda_graphs else 1
        self._prompt_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.prompt_compiled = False  # the prompt graphs replay the compiled forwards (with `compile`)
        # The forwards every path calls; compiled with dynamic token counts (one graph for 1 token, one for more).
        # The draft's projections in decoding's layout (q/k/v and gate/up fused, each through skinny_linear;
        # `draft_layout=False`: as modules, cuBLAS, to measure what the layout buys).
        self._dw = draft.decode_weights() if draft_layout else None
        self._target_fwd, self._draft_fwd, self._logits = self.target, self._draft_rows, self._draft_logits
        self._next, self._top, self._accept = self._draft_next, self._draft_top, self._accept_chain
        self._sample, self._accept_s = self._draft_sample, self._accept_chain_sampled
        self._tree_next, self._frontier = self._tree_next_state, self._tree_frontier
        self._children, self._keep = self._tree_children, self._tree_keep
        self._ancestors, self._tree_acc = self._tree_ancestors, self._tree_accept
        self._tree_acc_s = self._tree_accept_sampled
        if compile:
            self.target.compile()  # sets dynamo's recompile limit high enough for the decoders of a sweep
            self._draft_fwd = torch.compile(self._draft_rows, dynamic=True)
            self._logits = torch.compile(self._draft_logits, dynamic=True)
            self._next = torch.compile(self._draft_next, dynamic=True)
            self._top = torch.compile(self._draft_top, dynamic=True)
            self._accept = torch.compile(self._accept_chain, dynamic=True)
            self._sample = torch.compile(self._draft_sample, dynamic=True)
            self._accept_s = torch.compile(self._accept_chain_sampled, dynamic=True)
            for name, fn in (("_tree_next", self._tree_next_state), ("_frontier", self._tree_frontier),
                             ("_children", self._tree_children), ("_keep", self._tree_keep),
                             ("_ancestors", self._tree_ancestors), ("_tree_acc", self._tree_accept),
                             ("_tree_acc_s", self._tree_accept_sampled)):
                setattr(self, name, torch.compile(fn, dynamic=True))

    # ---- the forwards, each over its static cache; replayed from CUDA graphs where enabled ----

    def _fit(self, need: int) -> int:
        '''Make the forwards that follow attend over the first `need` slots of each cache, rounded up to a multiple
        of `span_step` (at most the whole cache): a short context then does not pay for reading, and masking out,
        a long empty cache, where attention takes a dense mask. Returns the span (a graph key).'''
        self._span = -(-need // self.span_step) * self.span_step
        return self._span

    def _mask(self, prefix: torch.Tensor, local: torch.Tensor) -> SlotMask:
        '''Rows that read every slot before `prefix` ([1] or 0-dim, on the device) and the `local` [S, T] marks
        of the T slots from there, over the span `_fit` set.'''
        return SlotMask(prefix.reshape(1), local, self._span)

    def _run(self, key, fn, *args, clone: bool = True, pool=None):
        """fn(*args), from a CUDA graph captured on first use with these very inputs. Capturing is
        idempotent: the forward writes the same cache slots with the same values as the real call.
        `clone=False`: the graph's own output tensors, valid until its next replay. `pool`: see CapturedCall."""
        if not self.cuda_graphs or key is None:
            return fn(*args)
        call = self._graphs.get(key)
        if call is None:
            call = self._graphs[key] = CapturedCall(fn, args, pool)
        else:
            call.replay(args)
        if not clone:
            return call.outputs
        return tuple(o.clone() for o in call.outputs) if isinstance(call.outputs, tuple) else call.outputs.clone()

    def _target(self, tokens, positions, slots, prefix, local):
        """The target over a tree's `tokens` at `positions`, written at `slots`, reading as `_mask(prefix, local)`
        says (the host path's verification)."""
        fn = lambda t, p, s, pre, loc: self._target_fwd(t[None], p[None], s, self._mask(pre, loc))  # noqa: E731
        return self._run(("target", len(tokens), self._span), fn, tokens, positions, slots, prefix, local)

    def _draft_rows(self, tokens, hidden, positions, slots, mask, features: bool = False):
        """The draft layer over rows `tokens` [R], writing their keys and values at `slots` [R] of the draft
        cache and attending under `mask` (a SlotMask of R rows, or [1, R, L] over the first L slots); returns
        [1, R, H]. `hidden` [1, R, H]: the previous step's outputs, handed on through `draft.carry`; or with
        `features` the target's features [1, R, 3H], through `draft.project` (step 0). Both inside this
        function, so that their norms (EAGLE 3.1's fc_norm and norm_output) fuse into the compiled layer
        rather than run as some eight eager launches per norm inside a round's graph."""
        hidden = self.draft.project(hidden, self._dw) if features else self.draft.carry(hidden)

        def attend(q, k, v):
            self.dk.index_copy_(2, slots, k)
            self.dv.index_copy_(2, slots, v)
            span = min(mask.span, self.draft_slots) if isinstance(mask, SlotMask) else mask.shape[-1]
            return grouped_attention(q, self.dk[:, :, :span], self.dv[:, :, :span],
                                     cache_mask(mask, q.shape[1] // k.shape[1], span))

        return self.draft.layer(self.draft.embed(tokens[None]), hidden, positions[None], attend, self._dw)

    def _draft_logits(self, hidden):
        return self.draft.logits(hidden, self._dw)

    # The head and what follows it in one compiled function each (norm, lm_head, then argmax and the vocab map, or
    # log-softmax and top k), instead of eager launches after a compiled head inside a round's graph.
    def _draft_next(self, hidden):
        """Greedy: the next token (a target id) after each row of hidden [R, H]."""
        return self.draft_ids[self.draft.logits(hidden, self._dw).argmax(-1)]

    def _draft_top(self, hidden, k: int):
        """The k likeliest next tokens of each row of hidden [R, H]: target ids [R, k] and float32
        log-probabilities [R, k]."""
        top = torch.log_softmax(self.draft.logits(hidden, self._dw).float(), dim=-1).topk(k, dim=-1)
        return self.draft_ids[top.indices], top.values

    def _draft_sample(self, hidden, pos):
        """Sampling: a draft token for each row of hidden [R, H] at positions pos [R], drawn from the draft's
        q = softmax(logits / T) over its vocab (Gumbel-max, `DRAFT_LANE`): its target id [R], and q [R, Vd]."""
        scores = self.draft.logits(hidden, self._dw).float() / self.temperature
        return self.draft_ids[self._gumbel_pick(scores, pos, DRAFT_LANE, self._draft_hash)], scores.softmax(-1)

    def _draft(self, tokens, hidden, positions, slots, mask, features: bool = False):
        return self._draft_fwd(tokens, hidden, positions, slots, mask, features)

    # ---- sampling's noise ----

    def _seed_turn(self, seed: Optional[int]) -> None:
        """Root the noise of the turn that starts in `seed` (default: the decoder's)."""
        self._seed_t.fill_(int(row_seeds(self.seed if seed is None else seed, [0])[0]))

    def _rows(self, pos: torch.Tensor) -> torch.Tensor:
        """The noise's row seeds [R] of the tokens at positions pos [R] in this turn."""
        return mix32(self._seed_t ^ mix32(pos & MASK32))

    def _uniforms(self, pos: torch.Tensor, lane: int, columns: torch.Tensor) -> torch.Tensor:
        """Uniforms in (0, 1) [R, C] for the tokens at positions pos [R] in `lane`, one per column hash [C]: a
        function of the turn's seed, the position, the lane and the column alone."""
        return uniform_noise(self._rows(pos), self._lanes[lane:lane + 1], columns)

    def _gumbel_pick(self, scores: torch.Tensor, pos: torch.Tensor, lane: int, columns: torch.Tensor) -> torch.Tensor:
        """argmax(scores + Gumbel noise) per row [R]: a draw from softmax(scores) (scores [R, C]: logits / T, or
        log-probabilities, over the tokens whose hashes are `columns`)."""
        return (scores + gumbel_noise(self._rows(pos), self._lanes[lane:lane + 1], columns)).argmax(-1)

    # ---- plain decoding ----

    @torch.no_grad()
    def generate_plain(self, prompt: list[int], max_new_tokens: int, eos_id: Optional[int] = None,
                       seed: Optional[int] = None):
        """The baseline: one target forward per token, same forward as verification, `plain_block` steps per
        replay and one host read per block (tokens past the end are dropped); sampled tokens draw from the
        noise of their positions, as a speculative turn's do."""
        self._seed_turn(seed)
        t0 = time.perf_counter()
        logits, _ = self._prefill(prompt)
        out, stats = [], DecodeStats()
        n = len(prompt)
        tok = self._pick(logits, n)
        while True:
            out.append(tok)
            if tok == eos_id or len(out) >= max_new_tokens or n + 1 >= self.max_len:
                break
            block = min(self.plain_block, max_new_tokens - len(out), self.max_len - 1 - n)
            span = self._fit(n + block)
            toks = self._run(("plain", block, span), lambda t, n_t, b=block: self._plain_steps(t, n_t, b),
                             torch.tensor([tok], device=self.device), torch.tensor([n], device=self.device),
                             clone=False).tolist()
            done = next((j for j, t in enumerate(toks) if t == eos_id), len(toks) - 1)
            out += toks[:done]
            stats.target_forwards += done + 1
            stats.accept_lengths += [1] * (done + 1)
            n += done + 1
            tok = toks[done]
        stats.new_tokens, stats.seconds = len(out), time.perf_counter() - t0
        self.cache_len = n
        return out, stats

    def _plain_steps(self, tok: torch.Tensor, n_t: torch.Tensor, block: int) -> torch.Tensor:
        """`block` steps from token `tok` [1] at position n_t [1], each step's token (argmax, or sampled at the
        temperature) feeding the next on the device; returns the `block` tokens they produce."""
        out = []
        for j in range(block):
            pos = n_t + j
            logits, _ = self._target_fwd(tok[None], pos[None], pos, self._mask(pos, self._tril[:1, :1]),
                                         features=False)
            if self.temperature <= 0:
                tok = logits[0, -1:].argmax(-1)
            else:
                tok = self._gumbel_pick(logits[0, -1:].float() / self.temperature, pos + 1, TARGET_LANE,
                                        self._token_hash)
            out.append(tok)
        return torch.cat(out)

    def _pick(self, logits, pos: int) -> int:
        """The token at position `pos` from the target's logits there: argmax, or drawn from softmax(logits / T)
        (`TARGET_LANE`)."""
        if self.temperature <= 0:
            return int(logits.argmax())
        scores = logits.reshape(1, -1).float() / self.temperature
        return int(self._gumbel_pick(scores, torch.tensor([pos], device=self.device), TARGET_LANE, self._token_hash))

    # ---- a prompt's prefill: from slot 0, padded to a multiple of prompt_step (one graph per padded length) ----

    def _prompt_rows(self, rows: int, cache: int) -> int:
        """`rows` rounded up to a multiple of prompt_step, within a cache of `cache` slots."""
        return min(-(-rows // self.prompt_step) * self.prompt_step, cache)

    def _causal(self, rows: int) -> torch.Tensor:
        """[1, rows, rows] causal mask over cache slots 0..rows-1, built on the device (inside a graph)."""
        idx = self._arange[:rows]
        return (idx[None, :] <= idx[:, None])[None]

    def _prompt_target(self, tokens: torch.Tensor, last: torch.Tensor):
        """The target over a (padded) prompt at slots 0..P-1; logits of row `last` [1] only. Rows past the
        prompt write slots that decoding overwrites before any query reads them (reads stop at the length)."""
        idx = self._arange[:tokens.numel()]
        logits, aux = self.target(tokens[None], idx[None], idx, self._causal(idx.numel()),
                                  eager=not self.prompt_compiled, logit_rows=last)
        return logits[0, 0], aux[0]

    def _prompt_draft(self, aux: torch.Tensor, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The draft's step 0 over a (padded) prompt at positions and slots 0..P-1; its output at row `last`."""
        idx = self._arange[:tokens.numel()]
        draft = self._draft_fwd if self.prompt_compiled else self._draft_rows
        h = draft(tokens, aux[None], idx, idx, self._causal(idx.numel()), True)
        return h[0].index_select(0, last)[0]

    def _prefill(self, prompt: list[int]):
        """The target over the prompt: (next-token logits [V], features [m, 3H])."""
        m = len(prompt)
        if m + 1 >= self.max_len:
            raise ValueError(f"prompt of {m} tokens does not fit max_len={self.max_len}")
        rows = self._prompt_rows(m, self.target.max_len)
        tokens = torch.tensor(prompt + [0] * (rows - m), device=self.device)
        logits, aux = self._run(("prompt", rows), self._prompt_target, tokens,
                                torch.tensor([m - 1], device=self.device), pool=self._prompt_pool)
        return logits, aux[:m]

    def _draft_prompt(self, aux: torch.Tensor, tokens_after: torch.Tensor) -> torch.Tensor:
        """The draft's step 0 over a prompt's positions 0..r-1 (features aux [r, 3H], the token after each)."""
        r = tokens_after.numel()
        rows = self._prompt_rows(r, self.draft_slots)
        if rows > r:
            aux = torch.cat([aux, aux.new_zeros(rows - r, aux.shape[-1])])
            tokens_after = torch.cat([tokens_after, tokens_after.new_zeros(rows - r)])
        return self._run(("draft_prompt", rows), self._prompt_draft, aux, tokens_after,
                         torch.tensor([r - 1], device=self.device), pool=self._prompt_pool)

    # ---- speculative decoding ----

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, eos_id: Optional[int] = None,
                 seed: Optional[int] = None):
        self._seed_turn(seed)
        if self.device_rounds:
            return self._generate_on_device(prompt, max_new_tokens, eos_id)
        t0 = time.perf_counter()
        logits, aux = self._prefill(prompt)
        n = len(prompt)  # tokens in the target's cache
        seq = list(prompt)
        first = self._pick(logits, n)
        out, stats = [first], DecodeStats()
        pending_aux, draft_len = aux, 0  # target features of positions draft_len..n-1, not yet read by the draft
        while first != eos_id and len(out) < max_new_tokens and n + self.num_draft_tokens + 1 < self.max_len:
            tokens_after = torch.tensor((seq + out)[draft_len + 1:n + 1], device=self.device)
            self._fit(self.round_slots(n))
            root_hidden = self._draft_prefill(pending_aux, tokens_after, draft_len, n)
            draft_len = n
            tree = self._propose(out[-1], root_hidden, n)
            path, bonus, verify_aux = self._verify(tree, n)
            # Keep the accepted path in the target cache: slots n + path -> n, n+1, ...
            src = n + torch.tensor(path, device=self.device)
            dst = n + torch.arange(len(path), device=self.device)
            self.target.move_slots(src, dst)
            pending_aux = verify_aux[torch.tensor(path, device=self.device)]
            accepted = [int(tree.tokens[i]) for i in path[1:]] + [bonus]
            n = self._take(accepted, out, stats, eos_id, max_new_tokens, n)
            if out[-1] == eos_id or len(out) >= max_new_tokens:
                break
        stats.new_tokens, stats.seconds = len(out), time.perf_counter() - t0
        self.cache_len, self.draft_len = n, draft_len
        return out, stats

    @staticmethod
    def _take(accepted: list[int], out: list[int], stats: DecodeStats, eos_id, max_new_tokens: int, n: int) -> int:
        """Append a round's tokens up to an end of sequence or the token budget; returns the new cache length."""
        stats.target_forwards += 1
        before = len(out)
        for tok in accepted:
            out.append(tok)
            if tok == eos_id or len(out) >= max_new_tokens:
                break
        stats.accept_lengths.append(len(out) - before)
        return n + len(accepted)

    def _stash(self, summary: torch.Tensor, k: int):
        """Copy a round's summary aside (slot k % 2) before the next replay overwrites it: on a GPU into pinned
        host memory without waiting, with an event that says when it is there. Returns what `_read` takes."""
        if summary.device.type != "cuda":
            return summary.clone(), None
        key = (k % 2, summary.numel(), summary.dtype)
        if key not in self._stash_bufs:
            self._stash_bufs[key] = (torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True),
                                     torch.cuda.Event())
        host, event = self._stash_bufs[key]
        host.copy_(summary, non_blocking=True)
        event.record()
        return host, event

    @staticmethod
    def _read(stashed) -> list[int]:
        host, event = stashed
        if event is not None:
            event.synchronize()
        return host.tolist()

    def _generate_on_device(self, prompt: list[int], max_new_tokens: int, eos_id: Optional[int]):
        """Rounds whose state stays on the device: per round one call of `_round` (one graph replay
        on a GPU) and one host read of its summary [accepted a, bonus, path tokens].

        One round ahead: where the round's graph does not depend on the cache length (one span serves every
        length: the whole-cache attention), the next round is launched before this one's summary is read, so the
        device runs it while the host reads and books the last one, instead of waiting for the host. It is
        launched only where it surely stays inside the cache and the token budget; a turn that ends on an end of
        sequence wastes that one round. Its writes lie past the kept length in both caches (rolled back
        implicitly, as a round's rejected tokens are), and the tokens are those of reading each round first."""
        t0 = time.perf_counter()
        logits, aux = self._prefill(prompt)
        m = len(prompt)
        out, stats = [self._pick(logits, m)], DecodeStats()
        # The draft's step 0 over the prompt's positions but the last; the last (its features, and the first
        # new token after it) is the first round's pending row.
        if m > 1:
            self._draft_prefill(aux[:m - 1], torch.tensor(prompt[1:], device=self.device), 0, m - 1)
        w = self.path_rows
        pend_aux = aux.new_zeros(w, aux.shape[-1])
        pend_aux[0] = aux[m - 1]
        pend_tok = torch.zeros(w, dtype=torch.long, device=self.device)
        pend_tok[0] = out[0]
        state = [torch.tensor([m], device=self.device), pend_aux, pend_tok, torch.ones(1, dtype=torch.long,
                                                                                       device=self.device)]
        n, count = m, 1
        round_fn = self._chain_round if self.topk == 1 else self._tree_round
        last = self.max_len - self.num_draft_tokens - 2  # the longest cache a round starts at (`fits`)
        ahead = self.rounds_ahead and self._fit(self.round_slots(0)) == self._fit(self.round_slots(last))
        inflight, launched = [], 0  # stashed summaries of rounds launched and not yet read, oldest first

        def fits(upto: int) -> bool:  # a round that starts at cache length <= upto stays inside the cache
            return upto + self.num_draft_tokens + 1 < self.max_len

        while out[-1] != eos_id and len(out) < max_new_tokens and fits(n):
            while len(inflight) < (2 if ahead else 1):
                bound = n + w * len(inflight)  # the most this round's start can be (each round keeps <= w tokens)
                if inflight and not (fits(bound) and len(out) + w * len(inflight) < max_new_tokens):
                    break
                span = self._fit(self.round_slots(bound))
                *state, summary = self._run(("round", span), round_fn, *state, clone=False)
                inflight.append(self._stash(summary, launched))
                launched += 1
            summary = self._read(inflight.pop(0))  # the one host read of the round
            a = summary[0]
            accepted = summary[2:2 + a] + [summary[1]]
            n = self._take(accepted, out, stats, eos_id, max_new_tokens, n)
            count = a + 1
        stats.new_tokens, stats.seconds = len(out), time.perf_counter() - t0
        self.cache_len, self.draft_len = n, n - count
        return out, stats

    def capture(self, upto: Optional[int] = None) -> int:
        """Capture, ahead of decoding, the graphs of every span a decode up to `upto` cache slots (default
        max_len) meets: one round per span and plain blocks of every length, so that a timed decode never
        captures (a server likewise captures at start-up); and the prompt graphs (`capture_prompts`). Leaves
        nothing behind that matters: the dummy rounds write cache slots that a later generate overwrites from its
        prefill on. Returns the graphs captured."""
        before = len(self._graphs)
        self.capture_prompts(upto)
        if not (self.cuda_graphs and self.device_rounds):
            return len(self._graphs) - before
        upto = min(upto or self.max_len, self.max_len)
        w, dev = self.path_rows, self.device
        pend_aux = torch.zeros(w, self.draft.fc.in_features, dtype=self.dk.dtype, device=dev)
        pend_tok, count = torch.zeros(w, dtype=torch.long, device=dev), torch.ones(1, dtype=torch.long, device=dev)
        round_fn = self._chain_round if self.topk == 1 else self._tree_round
        extra = self.round_slots(0)
        for span in range(self.span_step, upto + extra + self.span_step, self.span_step):
            n = min(span - extra, self.max_len - self.num_draft_tokens - 2)  # the last n a round of this span has
            key = ("round", self._fit(self.round_slots(n)))
            if n >= 1 and key not in self._graphs:
                self._run(key, round_fn, torch.tensor([n], device=dev), pend_aux, pend_tok, count, clone=False)
            for block in range(1, self.plain_block + 1):
                n = min(span - block, self.max_len - 1 - block)
                key = ("plain", block, self._fit(n + block))
                if n >= 1 and key not in self._graphs:
                    self._run(key, lambda t, n_t, b=block: self._plain_steps(t, n_t, b),
                              torch.zeros(1, dtype=torch.long, device=dev), torch.tensor([n], device=dev), clone=False)
        return len(self._graphs) - before

    def capture_prompts(self, upto: Optional[int] = None) -> int:
        """Capture the prefill graphs of every padded prompt length that a decode within `upto` cache slots
        (default max_len) can meet, i.e. prompts of up to upto - 2 tokens, the longest first, so that the shorter
        ones reuse its memory pool. Returns the graphs captured."""
        if not self.cuda_graphs:
            return 0
        before, longest = len(self._graphs), min(upto or self.max_len, self.max_len) - 2
        step = self.prompt_step
        padded = {self._prompt_rows(m, self.target.max_len) for m in range(step, longest + step, step)}
        for rows in sorted(padded, reverse=True):
            m = min(rows, longest)  # a prompt of m tokens pads to `rows`, and its m - 1 draft rows likewise
            _, aux = self._prefill([0] * m)
            self._draft_prompt(aux[:m - 1], torch.zeros(m - 1, dtype=torch.long, device=self.device))
        return len(self._graphs) - before

    def round_slots(self, n: int) -> int:
        """Cache slots a round at cache length n may write or read (the tree's, the draft's expanded nodes)."""
        return n + max(self.num_draft_tokens, self.spec_steps * self.topk, self.path_rows) + 1

    def _draft_prefill(self, aux, tokens_after, start: int, n: int) -> torch.Tensor:
        """Step 0 for positions start..n-1: target features there plus the token after each. Returns the
        draft's output at position n-1. From position 0 (a prompt): `_draft_prompt`."""
        rows = n - start
        if start == 0:
            return self._draft_prompt(aux, tokens_after)
        steps = self._arange[:rows]  # views of persistent tensors: a captured graph may read them later
        causal = self._tril[:rows, :rows]

        def fn(aux, toks, start_t):  # positions are built on the device (inside the graph)
            pos = start_t + steps
            return self._draft(toks, aux[None], pos, pos, self._mask(start_t, causal), True)[0, -1]

        return self._run(("draft_prefill", rows, self._span), fn, aux, tokens_after,
                         torch.tensor([start], device=self.device))

    def _draft_pending(self, n_t, pend_aux, pend_tok, count):
        """Step 0 of the draft over the rows the last round accepted (`count` of the `path_rows` rows hold
        them: positions n-count..n-1, their target features and the token after each), in fixed shape. The
        rows past `count` are filler: they write draft-cache slots >= n, which this round's draft steps
        overwrite before anything reads them. Returns the root token [1] (at position n) and the draft's
        output at position n-1 [H], which predicts the token after the root."""
        w = pend_tok.numel()
        pos = n_t - count + self._arange[:w]
        mask = self._mask(pos[0], self._tril[:w, :w])
        h = self._draft(pend_tok, pend_aux[None], pos, pos, mask, True)[0]
        last = count - 1
        return pend_tok.index_select(0, last), h.index_select(0, last)[0]

    def _chain_round(self, n_t, pend_aux, pend_tok, count):
        """A chain round in fixed shapes, on the device: draft prefill, S draft tokens, verification,
        acceptance (greedy, or speculative sampling). Returns the next round's state (n, pending features,
        pending tokens, count) and the summary [accepted a, bonus, d_1 .. d_S]."""
        root, root_hidden = self._draft_pending(n_t, pend_aux, pend_tok, count)
        if self.temperature > 0:
            chain, q = self._propose_chain_sampled(root, root_hidden, n_t)
        else:
            chain, q = self._propose_chain(root, root_hidden, n_t), None
        s = self.spec_steps
        rows = self._arange[:s + 1]
        pos = n_t + rows
        logits, aux = self._target_fwd(chain[None], pos[None], pos, self._mask(n_t, self._tril[:s + 1, :s + 1]))
        if q is None:
            n_next, after, count, summary = self._accept(chain, logits[0], n_t)
        else:
            n_next, after, count, summary = self._accept_s(chain, q, logits[0], n_t)
        return n_next, aux[0], after, count, summary

    def _accept_chain(self, chain, logits, n_t):
        """Greedy acceptance of chain [root, d_1 .. d_S] against the target's logits over it [S+1, V]: the next
        round's n and pending tokens and count, and the summary [accepted a, bonus, d_1 .. d_S]. One compiled
        function (a few fused kernels inside the round's graph, where its ops one by one were a dozen)."""
        rows = self._arange[:chain.numel()]
        choice = logits.argmax(-1)
        accepted = (chain[1:] == choice[:-1]).long().cumprod(0).sum()
        bonus = choice.index_select(0, accepted[None])  # no host read: this runs inside a graph
        # The token after each accepted position: the next draft token, and the bonus after the last.
        after = torch.where(rows == accepted, bonus, torch.cat([chain[1:], bonus]))
        summary = torch.cat([accepted[None], bonus, chain[1:]])
        return n_t + accepted + 1, after, (accepted + 1)[None], summary

    def _accept_chain_sampled(self, chain, q, logits, n_t):
        """Speculative sampling on chain [root, d_1 .. d_S] (d_k at position n+k, drawn from the draft's q [S, Vd])
        against the target's logits over it [S+1, V]: d_k is accepted with probability min(1, p(d_k) / q(d_k));
        after the first rejection the bonus is drawn from max(0, p - q) renormalised, after a full accept from p.
        Returns what `_accept_chain` does."""
        s = chain.numel() - 1
        rows = self._arange[:s + 1]
        p = torch.softmax(logits.float() / self.temperature, dim=-1)
        q_all = torch.zeros_like(p)  # q over the target vocab; none after the last draft token
        q_all[:s].index_copy_(1, self.draft_ids, q)
        x = chain[1:, None]
        u = self._uniforms(n_t + 1 + rows[:s], ACCEPT_LANE, self._sibling_hash[:1])[:, 0]
        ok = u * q_all[:s].gather(1, x)[:, 0] < p[:s].gather(1, x)[:, 0]
        accepted = ok.long().cumprod(0).sum()
        at = accepted[None]
        p_at = p.index_select(0, at)[0]
        residual = (p_at - q_all.index_select(0, at)[0]).clamp(min=0)
        residual = torch.where(residual.sum() > 0, residual, p_at)
        bonus = self._gumbel_pick(residual.log()[None], n_t + accepted + 1, TARGET_LANE, self._token_hash)
        after = torch.where(rows == accepted, bonus, torch.cat([chain[1:], bonus]))
        summary = torch.cat([accepted[None], bonus, chain[1:]])
        return n_t + accepted + 1, after, (accepted + 1)[None], summary

    def _propose_chain_sampled(self, root: torch.Tensor, root_hidden: torch.Tensor, n_t: torch.Tensor):
        """`_propose_chain` with each draft token drawn from the draft's distribution: [root, d_1 .. d_S] and the
        draft's q [S, Vd] at each."""
        s = self.spec_steps
        at = n_t + self._arange[:s + 1]  # at[k]: position n+k, where d_k lies
        tok, q = self._sample(root_hidden[None], at[1:2])
        tokens, qs = [root, tok], [q]
        hidden = root_hidden[None, None]
        for depth in range(1, s):
            pos = slot = at[depth - 1:depth]  # position n-1+depth, slot n+depth-1, as in `_propose_chain`
            hidden = self._draft(tok, hidden, pos, slot, self._mask(n_t, self._tril[depth - 1:depth, :depth]))
            tok, q = self._sample(hidden[0], at[depth + 1:depth + 2])
            tokens.append(tok)
            qs.append(q)
        return torch.cat(tokens), torch.cat(qs)

    def _propose_chain(self, root: torch.Tensor, root_hidden: torch.Tensor, n_t: torch.Tensor) -> torch.Tensor:
        """[root, d_1 .. d_S] as a device tensor. Draft token d_k sits at position n-1+k, cache slot n+k-1;
        it sees the prefix and the chain before it (exactly the TTT step-k pattern)."""
        tok = self._next(root_hidden[None])
        tokens = [root, tok]
        hidden = root_hidden[None, None]
        at = n_t + self._arange[:self.spec_steps]  # views of one sum, not two launches per step
        for depth in range(1, self.spec_steps):
            pos = slot = at[depth - 1:depth]  # position n-1+depth, slot n+depth-1: it sees the chain's slots n .. slot
            hidden = self._draft(tok, hidden, pos, slot,
                                 self._mask(n_t, self._tril[depth - 1:depth, :depth]))
            tok = self._next(hidden[0])
            tokens.append(tok)
        return torch.cat(tokens)

    def _tree_round(self, n_t, pend_aux, pend_tok, count):
        """A tree round in fixed shapes, on the device (the chain round's counterpart): draft prefill,
        propose, verify, pick the accepted path and move its cache entries. It builds the tree `_propose`
        builds and accepts the path `_verify` accepts. Returns the next round's state and the summary
        [accepted a, bonus, path tokens]."""
        root, root_hidden = self._draft_pending(n_t, pend_aux, pend_tok, count)
        tokens, parents, depths = self._propose_on_device(root, root_hidden, n_t)
        summary, path_aux = self._verify_on_device(tokens, parents, depths, n_t)
        n_next, after, count = self._tree_next(summary, n_t)
        return n_next, path_aux, after, count, summary

    # The tree round's bookkeeping between the draft's and the target's forwards, in compiled functions (`_tree_*`
    # as written, compiled under `compile`): one by one, their small ops were some 170 launches per round.
    def _tree_next_state(self, summary, n_t):
        """The next round's n, pending tokens and count from the summary [accepted a, bonus, path tokens]."""
        accepted, bonus = summary[0], summary[1:2]
        rows = self._arange[:self.path_rows]
        after = torch.where(rows == accepted, bonus, torch.cat([summary[2:], bonus]))
        return n_t + accepted + 1, after, (accepted + 1)[None]

    def _tree_frontier(self, score, tok, hidden, ancestors, n_t, depth: int):
        """The best k candidates of this depth (stable: ties to the lower pool index) and what the draft needs to
        expand them: their pool order, the ancestor marks over the draft's tree slots, tokens, parents' outputs,
        positions and slots."""
        k = self.topk
        rows = self._arange[:k]
        order = torch.sort(-score, stable=True).indices[:k]
        parent_row = order // k if depth > 1 else torch.zeros_like(order)
        # Each node sees its ancestors' slots and its own. (Elementwise, not a scalar index_put: what a CUDA
        # graph captures must not copy from the host.)
        region_slots = self._arange[:ancestors.shape[1]]
        ancestors = ancestors[parent_row] | (region_slots[None, :] == ((depth - 1) * k + rows)[:, None])
        return (order, ancestors, tok[order], hidden[parent_row], (n_t - 1 + depth).expand(k),
                n_t + (depth - 1) * k + rows)

    def _tree_children(self, out, score, order, offset: int, depth: int):
        """The top k children of each expanded node (outputs `out` [k, H]), scored by cumulative log-probability
        in float64: their tokens, scores, pool parents and depths [k*k]."""
        k = self.topk
        ids, logp = self._draft_top(out, k)
        score = (score[order][:, None] + logp.double()).flatten()
        parent = (offset + order)[:, None].expand(k, k).flatten()
        return ids.flatten(), score, parent, torch.full((k * k,), depth + 1, device=out.device)

    def _tree_keep(self, root, pool_tok, pool_score, pool_parent, pool_depth):
        """The num_draft_tokens - 1 best candidates of the pool (a child never outscores its parent; ties to the
        shallower node) in pool order, under the root: tokens, parents (tree indices, -1 at the root), depths."""
        all_score, all_parent = torch.cat(pool_score), torch.cat(pool_parent)
        keep = torch.sort(-all_score, stable=True).indices[: self.num_draft_tokens - 1].sort().values
        # pool index -> tree index (kept nodes only)
        tree_index = torch.zeros_like(all_parent).index_copy_(0, keep, self._arange[1:keep.numel() + 1])
        kept_parent = all_parent[keep]
        parents = torch.where(kept_parent < 0, 0, tree_index[kept_parent.clamp(min=0)])
        return (torch.cat([root, torch.cat(pool_tok)[keep]]),
                torch.cat([torch.full((1,), -1, device=root.device), parents]),
                torch.cat([torch.zeros(1, dtype=torch.long, device=root.device), torch.cat(pool_depth)[keep]]))

    def _tree_ancestors(self, parents):
        """[T, T] marks: node j is i or an ancestor of i."""
        t = parents.numel()
        idx = self._arange[:t]
        up = parents.clamp(min=0)  # the root is its own parent
        ancestors, node = idx[:, None] == idx[None, :], idx
        for _ in range(self.spec_steps):
            node = up[node]
            ancestors = ancestors | (idx[None, :] == node[:, None])
        return ancestors

    def _tree_accept(self, tokens, parents, depths, ancestors, logits):
        """A node is accepted when it and every ancestor equal the target's choice after their parent; the
        deepest accepted node ends the path. Returns the path (tree indices, padded to the longest path) and
        the summary [accepted draft tokens a, bonus, path tokens]."""
        t = tokens.numel()
        idx = self._arange[:t]
        choice = logits.argmax(-1)
        agrees = (tokens == choice[parents.clamp(min=0)]) | (idx == 0)
        accepted = ~(ancestors & ~agrees[None]).any(-1)
        # Siblings hold distinct tokens, so at most one node per depth is accepted. (Indexed by a 1-element
        # tensor, never a 0-dim one, which Python indexing may read back to the host.)
        best = torch.where(accepted, depths, -1).argmax(0, keepdim=True)
        width = min(self.spec_steps + 1, t)
        path = torch.where(ancestors.index_select(0, best)[0], idx, t + idx).sort().values[:width].clamp(max=t - 1)
        return path, torch.cat([depths.index_select(0, best), choice.index_select(0, best), tokens[path[1:]]])

    def _tree_accept_sampled(self, tokens, parents, depths, ancestors, logits, n_t):
        """`_accept_sampled_tree` in fixed shapes: from the root, each depth tries the current node's children in
        tree order, accepting child x with probability p(x) / sum(p) (p: the target's distribution after the
        node, less the siblings already rejected); the walk ends at the first depth where none is accepted, and
        the bonus is drawn from what p is left. Returns what `_tree_accept` does."""
        t, k = tokens.numel(), self.topk
        idx = self._arange[:t]
        p_all = torch.softmax(logits.float() / self.temperature, dim=-1)
        # children[i, r]: node i's r-th child in tree order (-1: none); a node's rank among its earlier siblings
        rank = ((parents[:, None] == parents[None, :]) & (idx[None, :] < idx[:, None])).sum(-1)
        children = torch.full((t, k), -1, dtype=torch.long, device=tokens.device)
        children[parents[1:], rank[1:]] = idx[1:]
        u = self._uniforms(n_t + 1 + self._arange[:self.spec_steps], ACCEPT_LANE, self._sibling_hash)  # [S, k]
        node, p = idx[:1], p_all[0]
        alive = torch.ones(1, dtype=torch.bool, device=tokens.device)
        for depth in range(self.spec_steps):
            found, nxt = ~alive, node  # a walk that has ended finds nothing more
            for r in range(k):
                child = children.index_select(0, node)[:, r]
                x = tokens.index_select(0, child.clamp(min=0))
                tried = ~found & (child >= 0)
                take = tried & (u[depth, r] * p.sum() < p.index_select(0, x))
                p = torch.where(tried & ~take & (self._vocab == x), 0.0, p)
                found, nxt = found | take, torch.where(take, child, nxt)
            alive = alive & found
            node = nxt
            p = torch.where(alive, p_all.index_select(0, node)[0], p)
        bonus = self._gumbel_pick(p.log()[None], n_t + depths.index_select(0, node) + 1, TARGET_LANE, self._token_hash)
        width = min(self.spec_steps + 1, t)
        path = torch.where(ancestors.index_select(0, node)[0], idx, t + idx).sort().values[:width].clamp(max=t - 1)
        return path, torch.cat([depths.index_select(0, node), bonus, tokens[path[1:]]])

    def _propose_on_device(self, root: torch.Tensor, root_hidden: torch.Tensor, n_t: torch.Tensor):
        """`_propose` in fixed shapes. Every depth after the first expands exactly `topk` nodes (the frontier);
        the candidate pool is laid out depth by depth, so "ties go to the lower pool index" (a stable sort)
        is also "ties go to the shallower node". Scores add up in float64, as the host path's Python floats do.
        Returns the tree's tokens [T], parents [T] (-1 at the root) and depths [T]."""
        k, steps = self.topk, self.spec_steps
        # Draft slots n .. n+region-1 hold the expanded nodes: frontier row r of depth d at slot n + (d-1)*k + r.
        region = steps * k
        ids, logp = self._top(root_hidden[None], k)
        tok, score = ids.flatten(), logp.double().flatten()
        pool_tok, pool_score = [tok], [score]
        pool_parent = [torch.full((k,), -1, device=self.device)]
        pool_depth = [torch.ones(k, dtype=torch.long, device=self.device)]
        offset = 0  # pool index of this depth's first candidate
        hidden = root_hidden[None].expand(k, -1)  # per candidate row's parent: the draft output it extends
        ancestors = torch.zeros(k, region, dtype=torch.bool, device=self.device)
        for depth in range(1, steps):
            order, ancestors, toks, parents_out, pos, slots = self._frontier(score, tok, hidden, ancestors, n_t, depth)
            out = self._draft(toks, parents_out[None], pos, slots, self._mask(n_t, ancestors))[0]
            tok, score, parent, dep = self._children(out, score, order, offset, depth)
            offset += k if depth == 1 else k * k
            pool_tok.append(tok)
            pool_score.append(score)
            pool_parent.append(parent)
            pool_depth.append(dep)
            hidden = out
        return self._keep(root, pool_tok, pool_score, pool_parent, pool_depth)

    def _verify_on_device(self, tokens, parents, depths, n_t):
        """`_verify` in fixed shapes: target forward under the ancestor mask; a node is accepted when it and
        every ancestor equal the target's choice after their parent; the deepest accepted node ends the path.
        Moves the path's cache entries into place. Returns ([accepted draft tokens a, bonus, path tokens],
        target features along the path), padded to the longest path. Sampling accepts by
        `_tree_accept_sampled`."""
        idx = self._arange[:tokens.numel()]
        ancestors = self._ancestors(parents)
        logits, aux = self.target(tokens[None], (n_t + depths)[None], n_t + idx, self._mask(n_t, ancestors))
        if self.temperature > 0:
            path, summary = self._tree_acc_s(tokens, parents, depths, ancestors, logits[0], n_t)
        else:
            path, summary = self._tree_acc(tokens, parents, depths, ancestors, logits[0])
        self.target.move_slots(n_t + path, n_t + self._arange[:path.numel()])
        return summary, aux[0][path]

    def _propose(self, root_token: int, root_hidden: torch.Tensor, n: int) -> Tree:
        """Best-first tree (EAGLE-2 style): expand the `topk` best frontier nodes per depth, then keep the
        `num_draft_tokens - 1` highest cumulative log-probability nodes."""
        k, steps = self.topk, self.spec_steps
        tokens, parents, depths, scores = [], [], [], []  # candidate pool (tree index = pool index + 1)
        draft_slot: dict[int, int] = {}  # pool index -> draft cache slot of its expanded entry
        node_hidden: dict[int, torch.Tensor] = {}  # pool index -> draft output of its expanded entry
        sampled_chain = self.temperature > 0 and k == 1  # a tree's candidates are the top k at any temperature
        probs = [] if sampled_chain else None
        frontier = [-1]  # pool indices to expand; -1 = root
        hidden = root_hidden[None]  # [len(frontier), H]
        for depth in range(1, steps + 1):
            if sampled_chain:  # the token at position n + depth, drawn from the draft's q
                tok, q = self._draft_sample(hidden, torch.tensor([n + depth], device=self.device))
                probs.append(q[0])
                cand = [(-1.0, frontier[0], int(tok[0]))]
            else:
                logp = torch.log_softmax(self._draft_logits(hidden).float(), dim=-1)  # [F, Vd]
                top = logp.topk(k, dim=-1)
                base = [0.0 if f < 0 else scores[f] for f in frontier]
                cand = [(base[i] + float(top.values[i, j]), frontier[i], int(self.draft_ids[top.indices[i, j]]))
                        for i in range(len(frontier)) for j in range(k)]
            first_new = len(tokens)
            for score, parent, token in cand:  # token: a target id
                tokens.append(token)
                parents.append(parent)
                depths.append(depth)
                scores.append(score)
            if depth == steps:
                break
            new = list(range(first_new, len(tokens)))
            frontier = sorted(new, key=lambda i: (-scores[i], i))[:k]
            # One draft forward over the frontier: each node sees the prefix and its own ancestors.
            slots = torch.tensor([n + (depth - 1) * k + j for j in range(len(frontier))], device=self.device)
            local = torch.zeros(len(frontier), steps * k, dtype=torch.bool)  # over draft slots n, n+1, ...
            parent_hidden = []
            for row, node in enumerate(frontier):
                draft_slot[node] = (depth - 1) * k + row
                a = node
                while a >= 0:
                    local[row, draft_slot[a]] = True
                    a = parents[a]
                parent_hidden.append(root_hidden if parents[node] < 0 else node_hidden[parents[node]])
            toks = torch.tensor([tokens[i] for i in frontier], device=self.device)
            pos = torch.full((len(frontier),), n - 1 + depth, device=self.device)
            out = self._run(("draft_step", len(frontier), self._span),
                            lambda t, h, p, s, pre, loc: self._draft(t, h, p, s, self._mask(pre, loc))[0],
                            toks, torch.stack(parent_hidden)[None], pos, slots,
                            torch.tensor([n], device=self.device), local.to(self.device))
            for row, node in enumerate(frontier):
                node_hidden[node] = out[row]
            hidden = out
        # Keep the best nodes; a child never outscores its parent, and ties go to the shallower node,
        # so the kept set is closed under ancestors.
        keep = sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i], i))[: self.num_draft_tokens - 1]
        keep = sorted(keep, key=lambda i: (depths[i], i))
        index = {p: t + 1 for t, p in enumerate(keep)}
        tree_parents = [-1] + [0 if parents[p] < 0 else index[parents[p]] for p in keep]
        tree_tokens = torch.tensor([root_token] + [tokens[p] for p in keep], device=self.device)
        tree_depths = torch.tensor([0] + [depths[p] for p in keep], device=self.device)
        return Tree(tree_tokens, tree_parents, tree_depths, probs)

    def _verify(self, tree: Tree, n: int):
        """Target forward over the tree; returns (accepted tree path from the root, bonus token, aux)."""
        t = len(tree.parents)
        slots = n + torch.arange(t, device=self.device)
        local = torch.zeros(t, t, dtype=torch.bool)  # over target slots n .. n+t-1
        for i in range(t):
            a = i
            while a >= 0:
                local[i, a] = True
                a = tree.parents[a]
        logits, aux = self._target(tree.tokens, n + tree.depths, slots, torch.tensor([n], device=self.device),
                                   local.to(self.device))
        logits, aux = logits[0], aux[0]
        if self.temperature > 0:
            accept = self._accept_sampled if tree.draft_probs is not None else self._accept_sampled_tree
            return accept(tree, logits, n) + (aux,)
        children: dict[int, list[int]] = {}
        for i, p in enumerate(tree.parents[1:], 1):
            children.setdefault(p, []).append(i)
        path, node = [0], 0
        choice = logits.argmax(-1).tolist()
        while True:
            nxt = [c for c in children.get(node, []) if int(tree.tokens[c]) == choice[node]]
            if not nxt:
                break
            node = nxt[0]
            path.append(node)
        return path, choice[node], aux

    def _accept_sampled(self, tree: Tree, logits, n: int):
        """Speculative sampling on a chain (the token at tree index i lies at position n + i): accept draft token
        x with probability min(1, p(x)/q(x)); on rejection draw from max(0, p - q) renormalised; after a full
        accept, draw the bonus from p. One decision at a time, from the noise the device rounds read."""
        p_all = torch.softmax(logits.float() / self.temperature, dim=-1)
        path = [0]
        for i in range(1, len(tree.parents) + 1):
            p, q = p_all[i - 1], torch.zeros_like(p_all[0])
            at = torch.tensor([n + i], device=self.device)
            if i < len(tree.parents):
                q[self.draft_ids] = tree.draft_probs[i - 1]
                x = int(tree.tokens[i])
                if self._uniforms(at, ACCEPT_LANE, self._sibling_hash[:1])[0, 0] * q[x] < p[x]:
                    path.append(i)
                    continue
            residual = (p - q).clamp(min=0)
            if residual.sum() <= 0:
                residual = p
            return path, int(self._gumbel_pick(residual.log()[None], at, TARGET_LANE, self._token_hash))

    def _accept_sampled_tree(self, tree: Tree, logits, n: int):
        """Speculative sampling on a tree of top-k candidates. A candidate chosen without sampling is a proposal
        that puts all its mass on one token, so rejection sampling against it reads: accept child x with
        probability p(x) / sum(p); on rejection remove x from p, then try the next sibling; when no child is
        accepted, draw the bonus from what is left. Each emitted token is thus distributed as p."""
        p_all = torch.softmax(logits.float() / self.temperature, dim=-1)
        children: dict[int, list[int]] = {}
        for i, parent in enumerate(tree.parents[1:], 1):
            children.setdefault(parent, []).append(i)
        tokens = tree.tokens.tolist()
        path, p = [0], p_all[0].clone()
        while True:
            at = torch.tensor([n + len(path)], device=self.device)  # the position of the children tried
            u = self._uniforms(at, ACCEPT_LANE, self._sibling_hash)[0]
            for rank, child in enumerate(children.get(path[-1], [])):
                x = tokens[child]
                if u[rank] * p.sum() < p[x]:
                    path.append(child)
                    p = p_all[child].clone()
                    break
                p[x] = 0.0
            else:
                return path, int(self._gumbel_pick(p.log()[None], at, TARGET_LANE, self._token_hash))
