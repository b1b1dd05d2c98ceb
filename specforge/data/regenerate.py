"""`specforge prepare-data`: answer every prompt with the target itself.

A draft is judged by how often it guesses the target's next token, so it learns best from the target's
own outputs rather than from answers some other model wrote."""

from __future__ import annotations

import inspect

import torch
from tqdm import tqdm

from .conversations import Conversation
from .template import prompt_ids


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int,
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 32, desc: str = "") -> list[str]:
    """Batched generation (left padded) of the next assistant turn for each message list."""
    device = next(model.parameters()).device
    encoded = [prompt_ids(tokenizer, m) for m in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = [""] * len(encoded)
    gen = torch.Generator(device=device).manual_seed(seed)
    bar = tqdm(total=len(encoded), desc=desc or "generating", unit="prompt")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        t = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), t), pad, dtype=torch.long)
        att = torch.zeros(len(idx), t, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, t - len(encoded[i]):] = torch.tensor(encoded[i])
            att[r, t - len(encoded[i]):] = 1
        out = _generate(model, ids.to(device), att.to(device), max_new_tokens, temperature, gen,
                        tokenizer.eos_token_id, pad)
        for r, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[r], skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return answers


def _generate(model, ids, att, max_new_tokens, temperature, gen, eos_id, pad_id) -> list[list[int]]:
    """Plain decoding loop over HF's cache: greedy, or seeded sampling at `temperature`."""
    b = ids.shape[0]
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = getattr(out, cache_key)
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    tokens = []
    logits = out.logits[:, -1].float()
    next_pos = pos[:, -1:] + 1
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        att = torch.cat([att, (~done).long()[:, None] | 1], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=next_pos,
                    use_cache=True, **{cache_key: cache})
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    seqs = torch.stack(tokens, dim=1).tolist()
    result = []
    for row in seqs:
        cut = row.index(eos_id) if eos_id in row else len(row)
        result.append(row[:cut])
    return result


def regenerate(model, tokenizer, conversations: list[Conversation], max_new_tokens: int, temperature: float,
               seed: int, batch_size: int) -> list[Conversation]:
    """Replace (or fill in) every assistant turn with the target's own answer, turn by turn."""
    convs = [Conversation(messages=[m for m in c.messages if m["role"] != "assistant"], id=c.id,
                          category=c.category) for c in conversations]
    max_turns = max(len(c.user_turns()) for c in convs)
    result = [[m for m in c.messages if m["role"] == "system"] for c in convs]
    for turn in range(max_turns):
        active = [i for i, c in enumerate(convs) if len(c.user_turns()) > turn]
        for i in active:
            result[i].append({"role": "user", "content": convs[i].user_turns()[turn]})
        answers = generate_answers(model, tokenizer, [result[i] for i in active], max_new_tokens, temperature,
                                   seed + turn, batch_size, desc=f"turn {turn + 1}/{max_turns}")
        for i, a in zip(active, answers):
            result[i].append({"role": "assistant", "content": a or "(no answer)"})
    return [Conversation(messages=m, id=c.id, category=c.category) for m, c in zip(result, convs)]
