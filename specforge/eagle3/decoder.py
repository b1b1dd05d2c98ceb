"""Speculative decoding with an EAGLE-3 draft: chain or tree drafting, greedy or sampled verification.

One round: the draft reads the target features of the tokens accepted last round (its step-0 input, as
in training), proposes a tree of candidate tokens (a chain is the tree with topk=1), the target scores
the whole tree in one forward under an ancestor mask, and the longest path the target agrees with is
kept, plus the target's own next token (the bonus). Rejected entries are dropped from both KV caches by
moving the accepted path's entries into place; the rest lie past the new length and are masked out.

Plain decoding uses the same target forward one token at a time, so on the CPU in float32 greedy
speculative output equals plain greedy output token for token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..graphs import CapturedCall
from ..layers import cache_mask, grouped_attention
from .draft import Eagle3Draft
from ..static_target import StaticTarget


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
    """Batch size 1. `spec_steps` draft forwards per round; `topk` children per expanded node;
    `num_draft_tokens` tree nodes verified per round (root included; chain: spec_steps + 1)."""

    def __init__(self, target_model, draft: Eagle3Draft, aux_layer_ids: list[int], max_len: int = 2048,
                 spec_steps: int = 5, topk: int = 1, num_draft_tokens: Optional[int] = None,
                 temperature: float = 0.0, seed: int = 0, cuda_graphs: bool = False, device_rounds: bool = True):
        self.spec_steps, self.topk, self.temperature, self.seed = spec_steps, topk, temperature, seed
        self.num_draft_tokens = num_draft_tokens or spec_steps + 1
        max_nodes = 1 + sum(topk ** d if d == 1 else topk * topk for d in range(1, spec_steps + 1))
        if self.num_draft_tokens > max_nodes:
            raise ValueError(f"num_draft_tokens={self.num_draft_tokens} exceeds the {max_nodes} nodes that "
                             f"spec_steps={spec_steps}, topk={topk} can propose")
        self.max_len = max_len
        self.target = StaticTarget(target_model, aux_layer_ids, max_len + self.num_draft_tokens)
        self.draft = draft
        w = draft.fc.weight
        cfg = draft.config
        self.draft_slots = max_len + spec_steps * topk + 1
        shape = (1, cfg.num_key_value_heads, self.draft_slots, cfg.head_dim)
        self.dk = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.dv = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.device = w.device
        self.draft_ids = torch.arange(draft.d2t.numel(), device=self.device) + draft.d2t
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict = {}
        # Greedy rounds (chain or tree) keep every token on the device: one host sync per round. The host-side
        # path (`_propose` / `_verify`) serves sampling, and is the reference the device rounds are tested against.
        self.device_rounds = device_rounds and temperature <= 0
        # Slot indices of both caches, persistent (captured graphs read them on every replay).
        self._arange = torch.arange(max(self.target.k_cache.shape[3], self.draft_slots), device=self.device)
        self._slots_t = self._arange[:self.target.k_cache.shape[3]]
        self._slots_d = self._arange[:self.draft_slots]

    # ---- the forwards, each over its static cache; replayed from CUDA graphs where enabled ----

    def _run(self, key, fn, *args):
        """fn(*args), from a CUDA graph captured on first use with these very inputs. Capturing is
        idempotent: the forward writes the same cache slots with the same values as the real call."""
        if not self.cuda_graphs or key is None:
            return fn(*args)
        call = self._graphs.get(key)
        if call is None:
            call = self._graphs[key] = CapturedCall(fn, args)
        else:
            call.replay(args)
        return tuple(o.clone() for o in call.outputs) if isinstance(call.outputs, tuple) else call.outputs.clone()

    def _target(self, tokens, positions, slots, mask):
        fn = lambda t, p, s, m: self.target(t[None], p[None], s, m[None])  # noqa: E731
        return self._run(("target", len(tokens)) if len(tokens) <= self.num_draft_tokens else None,
                         fn, tokens, positions, slots, mask)

    def _draft(self, tokens, hidden, positions, slots, mask):
        def attend(q, k, v):
            self.dk.index_copy_(2, slots, k)
            self.dv.index_copy_(2, slots, v)
            return grouped_attention(q, self.dk, self.dv, cache_mask(mask[None], q.shape[1] // k.shape[1]))

        return self.draft.layer(self.draft.embed(tokens[None]), hidden, positions[None], attend)

    def _prefix_mask(self, rows: int, length: int, slots: int) -> torch.Tensor:
        """[rows, slots] boolean, True on the first `length` slots (a fresh tensor, for the caller to edit)."""
        return (self._arange[:slots] < length).expand(rows, slots).clone()

    # ---- plain decoding ----

    @torch.no_grad()
    def generate_plain(self, prompt: list[int], max_new_tokens: int, eos_id: Optional[int] = None,
                       seed: Optional[int] = None):
        """The baseline: one target forward per token, same forward as verification."""
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        t0 = time.perf_counter()
        logits, _ = self._prefill(prompt)
        out, stats = [], DecodeStats()
        n = len(prompt)
        tok = self._pick(logits, gen)
        while True:
            out.append(tok)
            if tok == eos_id or len(out) >= max_new_tokens or n + 1 >= self.max_len:
                break
            logits = self._decode_step(tok, n)
            stats.target_forwards += 1
            stats.accept_lengths.append(1)
            n += 1
            tok = self._pick(logits, gen)
        stats.new_tokens, stats.seconds = len(out), time.perf_counter() - t0
        self.cache_len = n
        return out, stats

    def _decode_step(self, tok: int, n: int) -> torch.Tensor:
        """One plain step: token `tok` at position n; returns the next-token logits."""

        def step(tok_t, n_t):
            mask = self._slots_t[None, :] <= n_t
            logits, _ = self.target(tok_t[None], n_t[None], n_t, mask[None])
            return logits[0, -1]

        return self._run(("decode",), step, torch.tensor([tok], device=self.device),
                         torch.tensor([n], device=self.device))

    def _pick(self, logits, gen) -> int:
        if self.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))

    def _prefill(self, prompt: list[int]):
        m = len(prompt)
        if m + 1 >= self.max_len:
            raise ValueError(f"prompt of {m} tokens does not fit max_len={self.max_len}")
        idx = torch.arange(m, device=self.device)
        mask = self._slots_t[None, :] <= idx[:, None]
        logits, aux = self._target(torch.tensor(prompt, device=self.device), idx, idx, mask)
        return logits[0, -1], aux[0]

    # ---- speculative decoding ----

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, eos_id: Optional[int] = None,
                 seed: Optional[int] = None):
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        t0 = time.perf_counter()
        logits, aux = self._prefill(prompt)
        n = len(prompt)  # tokens in the target's cache
        seq = list(prompt)
        first = self._pick(logits, gen)
        out, stats = [first], DecodeStats()
        pending_aux, draft_len = aux, 0  # target features of positions draft_len..n-1, not yet read by the draft
        while first != eos_id and len(out) < max_new_tokens and n + self.num_draft_tokens + 1 < self.max_len:
            tokens_after = torch.tensor((seq + out)[draft_len + 1:n + 1], device=self.device)
            root_hidden = self._draft_prefill(pending_aux, tokens_after, draft_len, n)
            draft_len = n
            if self.device_rounds:
                rnd = self._chain_round if self.topk == 1 else self._tree_round
                accepted, pending_aux = rnd(out[-1], root_hidden, n)
                path = range(len(accepted))
            else:
                tree = self._propose(out[-1], root_hidden, n, gen)
                path, bonus, verify_aux = self._verify(tree, n, gen)
                # Keep the accepted path in the target cache: slots n + path -> n, n+1, ...
                src = n + torch.tensor(path, device=self.device)
                dst = n + torch.arange(len(path), device=self.device)
                self.target.move_slots(src, dst)
                pending_aux = verify_aux[torch.tensor(path, device=self.device)]
                accepted = [int(tree.tokens[i]) for i in path[1:]] + [bonus]
            stats.target_forwards += 1
            stats.accept_lengths.append(len(accepted))
            seq_before = len(out)
            for tok in accepted:
                out.append(tok)
                if tok == eos_id or len(out) >= max_new_tokens:
                    break
            n += len(path)
            if out[-1] == eos_id or len(out) >= max_new_tokens:
                stats.accept_lengths[-1] = len(out) - seq_before
                break
        stats.new_tokens, stats.seconds = len(out), time.perf_counter() - t0
        self.cache_len, self.draft_len = n, draft_len
        return out, stats

    def _draft_prefill(self, aux, tokens_after, start: int, n: int) -> torch.Tensor:
        """Step 0 for positions start..n-1: target features there plus the token after each."""
        steps = self._arange[:n - start]  # a view of a persistent tensor: a captured graph may read it later

        def fn(aux, toks, start_t):  # positions and mask are built on the device (inside the graph)
            pos = start_t + steps
            mask = self._slots_d[None, :] <= pos[:, None]
            hidden = self.draft.project(aux[None])
            return self._draft(toks, hidden, pos, pos, mask)[0, -1]

        key = ("draft_prefill", n - start) if n - start <= self.spec_steps + 1 else None
        return self._run(key, fn, aux, tokens_after, torch.tensor([start], device=self.device))

    def _chain_round(self, root_token: int, root_hidden: torch.Tensor, n: int):
        """Greedy chain: draft S tokens and verify them with every token kept on the device; one host sync
        at the end reads the accepted count, the bonus and the tokens. Returns (accepted tokens including
        the bonus, target features of the accepted positions)."""
        n_t = torch.tensor([n], device=self.device)
        chain = self._propose_chain(root_token, root_hidden, n_t)
        s = self.spec_steps
        offsets = self._arange[:s + 1]  # persistent, as the captured graph reads it on every replay

        def verify(tokens, n_t):
            pos = n_t + offsets
            mask = self._slots_t[None, :] <= pos[:, None]
            logits, aux = self.target(tokens[None], pos[None], pos, mask[None])
            choice = logits[0].argmax(-1)
            agree = (tokens[1:] == choice[:-1]).long().cumprod(0)
            accepted = agree.sum()
            bonus = choice.index_select(0, accepted[None])  # no host sync: this runs inside a graph
            return torch.cat([accepted[None], bonus, tokens[1:]]), aux[0]

        summary, aux = self._run(("chain_verify",), verify, chain, n_t)
        summary = summary.tolist()  # the one host sync of the round
        a, bonus = summary[0], summary[1]
        return summary[2:2 + a] + [bonus], aux[:a + 1]

    def _propose_chain(self, root_token: int, root_hidden: torch.Tensor, n_t: torch.Tensor) -> torch.Tensor:
        """[root, d_1 .. d_S] as a device tensor. Draft token d_k sits at position n-1+k, cache slot n+k-1;
        it sees the prefix and the chain before it (exactly the TTT step-k pattern)."""
        tok = self.draft_ids[self.draft.logits(root_hidden[None]).argmax(-1)]
        tokens = [torch.tensor([root_token], device=self.device), tok]
        hidden = root_hidden[None, None]
        for depth in range(1, self.spec_steps):
            def step(tok, hidden, n_t, depth=depth):
                pos = n_t - 1 + depth
                slot = n_t + depth - 1
                mask = (self._slots_d < n_t) | ((self._slots_d >= n_t) & (self._slots_d <= slot))
                h = self._draft(tok, self.draft.carry(hidden), pos, slot, mask[None])
                return self.draft_ids[self.draft.logits(h[0]).argmax(-1)], h

            tok, hidden = self._run(("chain_step", depth), step, tok, hidden, n_t)
            tokens.append(tok)
        return torch.cat(tokens)

    def _tree_round(self, root_token: int, root_hidden: torch.Tensor, n: int):
        """Greedy tree with every step on the device (the chain round's counterpart): propose, verify, pick
        the accepted path and move its cache entries without reading anything back, then one host sync.
        It builds the tree `_propose` builds and accepts the path `_verify` accepts. Returns (accepted
        tokens including the bonus, target features of the accepted positions)."""
        n_t = torch.tensor([n], device=self.device)
        tokens, parents, depths = self._run(("tree_propose",), self._propose_on_device,
                                            torch.tensor([root_token], device=self.device), root_hidden, n_t)
        summary, aux = self._run(("tree_verify",), self._verify_on_device, tokens, parents, depths, n_t)
        summary = summary.tolist()  # the one host sync of the round
        a, bonus = summary[0], summary[1]
        return summary[2:2 + a] + [bonus], aux[:a + 1]

    def _propose_on_device(self, root: torch.Tensor, root_hidden: torch.Tensor, n_t: torch.Tensor):
        """`_propose` in fixed shapes. Every depth after the first expands exactly `topk` nodes (the frontier);
        the candidate pool is laid out depth by depth, so "ties go to the lower pool index" (a stable sort)
        is also "ties go to the shallower node". Scores add up in float64, as the host path's Python floats do.
        Returns the tree's tokens [T], parents [T] (-1 at the root) and depths [T]."""
        k, steps = self.topk, self.spec_steps
        rows = self._arange[:k]
        # Draft slots n .. n+region-1 hold the expanded nodes: frontier row r of depth d at slot n + (d-1)*k + r.
        region = steps * k
        rel = (self._slots_d - n_t).clamp(0, region - 1)
        in_region = (self._slots_d >= n_t) & (self._slots_d < n_t + region)
        prefix = self._slots_d < n_t

        def candidates(hidden, base):  # the top k children of each row, scored by cumulative log-probability
            top = torch.log_softmax(self.draft.logits(hidden).float(), dim=-1).topk(k, dim=-1)
            return self.draft_ids[top.indices].flatten(), (base[:, None] + top.values.double()).flatten()

        tok, score = candidates(root_hidden[None], torch.zeros(1, dtype=torch.float64, device=self.device))
        pool_tok, pool_score = [tok], [score]
        pool_parent = [torch.full((k,), -1, device=self.device)]
        pool_depth = [torch.ones(k, dtype=torch.long, device=self.device)]
        offset = 0  # pool index of this depth's first candidate
        hidden = root_hidden[None].expand(k, -1)  # per candidate row's parent: the draft output it extends
        ancestors = torch.zeros(k, region, dtype=torch.bool, device=self.device)
        region_slots = self._arange[:region]
        for depth in range(1, steps):
            order = torch.sort(-score, stable=True).indices[:k]  # the frontier: best k of this depth
            parent_row = order // k if depth > 1 else torch.zeros_like(order)
            # Each node sees its ancestors' slots and its own. (Elementwise, not a scalar index_put: what
            # a CUDA graph captures must not copy from the host.)
            ancestors = ancestors[parent_row] | (region_slots[None, :] == ((depth - 1) * k + rows)[:, None])
            mask = prefix | (in_region & ancestors[:, rel])
            out = self._draft(tok[order], self.draft.carry(hidden[parent_row][None]), (n_t - 1 + depth).expand(k),
                              n_t + (depth - 1) * k + rows, mask)[0]
            frontier_pool = offset + order
            offset += score.numel()
            tok, score = candidates(out, score[order])
            pool_tok.append(tok)
            pool_score.append(score)
            pool_parent.append(frontier_pool[:, None].expand(k, k).flatten())
            pool_depth.append(torch.full((k * k,), depth + 1, device=self.device))
            hidden = out
        all_score, all_parent = torch.cat(pool_score), torch.cat(pool_parent)
        keep = torch.sort(-all_score, stable=True).indices[: self.num_draft_tokens - 1].sort().values
        # pool index -> tree index (kept nodes only)
        tree_index = torch.zeros_like(all_parent).index_copy_(0, keep, self._arange[1:keep.numel() + 1])
        kept_parent = all_parent[keep]
        parents = torch.where(kept_parent < 0, 0, tree_index[kept_parent.clamp(min=0)])
        return (torch.cat([root, torch.cat(pool_tok)[keep]]),
                torch.cat([torch.full((1,), -1, device=self.device), parents]),
                torch.cat([torch.zeros(1, dtype=torch.long, device=self.device), torch.cat(pool_depth)[keep]]))

    def _verify_on_device(self, tokens, parents, depths, n_t):
        """`_verify` in fixed shapes: target forward under the ancestor mask; a node is accepted when it and
        every ancestor equal the target's choice after their parent; the deepest accepted node ends the path.
        Moves the path's cache entries into place. Returns ([accepted draft tokens a, bonus, path tokens],
        target features along the path), padded to the longest path."""
        t = tokens.numel()
        idx = self._arange[:t]
        up = parents.clamp(min=0)  # the root is its own parent
        ancestors, node = idx[:, None] == idx[None, :], idx
        for _ in range(self.spec_steps):
            node = up[node]
            ancestors = ancestors | (idx[None, :] == node[:, None])
        slots_t = self._slots_t
        in_tree = (slots_t >= n_t) & (slots_t < n_t + t)
        mask = (slots_t < n_t) | (in_tree & ancestors[:, (slots_t - n_t).clamp(0, t - 1)])
        logits, aux = self.target(tokens[None], (n_t + depths)[None], n_t + idx, mask[None])
        choice = logits[0].argmax(-1)
        agrees = (tokens == choice[up]) | (idx == 0)
        accepted = ~(ancestors & ~agrees[None]).any(-1)
        # Siblings hold distinct tokens, so at most one node per depth is accepted. (Indexed by a 1-element
        # tensor, never a 0-dim one, which Python indexing may read back to the host.)
        best = torch.where(accepted, depths, -1).argmax(0, keepdim=True)
        width = min(self.spec_steps + 1, t)
        path = torch.where(ancestors.index_select(0, best)[0], idx, t + idx).sort().values[:width].clamp(max=t - 1)
        self.target.move_slots(n_t + path, n_t + self._arange[:width])
        summary = torch.cat([depths.index_select(0, best), choice.index_select(0, best), tokens[path[1:]]])
        return summary, aux[0][path]

    def _propose(self, root_token: int, root_hidden: torch.Tensor, n: int, gen) -> Tree:
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
            logits = self.draft.logits(hidden).float()  # [F, Vd]
            if sampled_chain:
                q = torch.softmax(logits[0].cpu() / self.temperature, dim=-1)
                choice = torch.multinomial(q, 1, generator=gen)
                probs.append(q)
                cand = [(-1.0, frontier[0], int(choice))]
            else:
                logp = torch.log_softmax(logits, dim=-1)
                top = logp.topk(k, dim=-1)
                base = [0.0 if f < 0 else scores[f] for f in frontier]
                cand = [(base[i] + float(top.values[i, j]), frontier[i], int(top.indices[i, j]))
                        for i in range(len(frontier)) for j in range(k)]
            first_new = len(tokens)
            for score, parent, draft_id in cand:
                tokens.append(int(self.draft_ids[draft_id]))
                parents.append(parent)
                depths.append(depth)
                scores.append(score)
            if depth == steps:
                break
            new = list(range(first_new, len(tokens)))
            frontier = sorted(new, key=lambda i: (-scores[i], i))[:k]
            # One draft forward over the frontier: each node sees the prefix and its own ancestors.
            slots = torch.tensor([n + (depth - 1) * k + j for j in range(len(frontier))], device=self.device)
            mask = self._prefix_mask(len(frontier), n, self.draft_slots)
            parent_hidden = []
            for row, node in enumerate(frontier):
                draft_slot[node] = int(slots[row])
                a = node
                while a >= 0:
                    mask[row, draft_slot[a]] = True
                    a = parents[a]
                parent_hidden.append(root_hidden if parents[node] < 0 else node_hidden[parents[node]])
            toks = torch.tensor([tokens[i] for i in frontier], device=self.device)
            pos = torch.full((len(frontier),), n - 1 + depth, device=self.device)
            out = self._run(("draft_step", len(frontier)), lambda *a: self._draft(*a)[0],
                            toks, self.draft.carry(torch.stack(parent_hidden)[None]), pos, slots, mask)
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

    def _verify(self, tree: Tree, n: int, gen):
        """Target forward over the tree; returns (accepted tree path from the root, bonus token, aux)."""
        t = len(tree.parents)
        slots = n + torch.arange(t, device=self.device)
        mask = self._prefix_mask(t, n, self.target.k_cache.shape[3])
        for i in range(t):
            a = i
            while a >= 0:
                mask[i, n + a] = True
                a = tree.parents[a]
        logits, aux = self._target(tree.tokens, n + tree.depths, slots, mask)
        logits, aux = logits[0], aux[0]
        if self.temperature > 0:
            accept = self._accept_sampled if tree.draft_probs is not None else self._accept_sampled_tree
            return accept(tree, logits, gen) + (aux,)
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

    def _accept_sampled(self, tree: Tree, logits, gen):
        """Speculative sampling on a chain: accept draft token x with probability min(1, p(x)/q(x)); on
        rejection sample from max(0, p - q) renormalised; after a full accept, sample the bonus from p."""
        p_all = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        d2t = self.draft_ids.cpu()
        path = [0]
        for i in range(1, len(tree.parents)):
            p = p_all[i - 1]
            q = torch.zeros_like(p)
            q[d2t] = tree.draft_probs[i - 1]
            x = int(tree.tokens[i])
            r = float(torch.rand(1, generator=gen))
            if r * float(q[x]) < float(p[x]):
                path.append(i)
                continue
            residual = (p - q).clamp(min=0)
            return path, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
        return path, int(torch.multinomial(p_all[len(path) - 1], 1, generator=gen))


    def _accept_sampled_tree(self, tree: Tree, logits, gen):
        """Speculative sampling on a tree of top-k candidates. A candidate chosen without sampling is a proposal
        that puts all its mass on one token, so rejection sampling against it reads: accept child x with
        probability p(x); on rejection remove x from p and renormalise, then try the next sibling; when no
        child is accepted, sample the bonus from what is left. Each emitted token is thus distributed as p."""
        p_all = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        children: dict[int, list[int]] = {}
        for i, parent in enumerate(tree.parents[1:], 1):
            children.setdefault(parent, []).append(i)
        tokens = tree.tokens.tolist()
        path, p = [0], p_all[0].clone()
        while True:
            for child in children.get(path[-1], []):
                x = tokens[child]
                if float(torch.rand(1, generator=gen)) < float(p[x]):
                    path.append(child)
                    p = p_all[child].clone()
                    break
                p[x] = 0.0
                p = p / p.sum()
            else:
                return path, int(torch.multinomial(p, 1, generator=gen))
