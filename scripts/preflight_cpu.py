"""A CPU pre-flight of GPU decoding code, for sessions without a GPU: the decoder and the static-cache target run
with the GPU's custom ops in play (`skinny_linear` and its `add_norm_linear`, `cache_attention`), their Triton
kernels replaced by float64 PyTorch, and torch.compile'd by inductor's CPU backend. So what dynamo and inductor
make of a change to the GPU path (graph breaks, recompiles, kernels per layer, and the decoder's tokens) can be
seen before device time is spent on it. Nothing here times anything.

The ops are defined only where `import triton` works: `pip install --target DIR triton==3.6.0` and put DIR on
PYTHONPATH (no GPU needed). Run it from the tree to check, with that tree first on PYTHONPATH:

  PYTHONPATH=DIR:. python scripts/preflight_cpu.py decode --json A.json   # in one tree, then in another: diff
  PYTHONPATH=DIR:. python scripts/preflight_cpu.py layer                  # kernels per compiled target layer

`decode`: a tiny bf16 Llama target and a draft with norm_output, trained a moment (tests/test_decoder.py), the
compiled decoder (chain S=4 and tree 3/10; `--temperature T`: sampled) on four prompts; writes each turn's tokens
and accept lengths (and plain decoding's tokens) and prints dynamo's counts. Two trees that decode alike give equal
files. The speculative tokens are not those of plain greedy here, on main too (they part after 2 to 34 tokens,
at near-ties of bf16 logits): with the same emulated ops, the static target's verify of 4 tokens gives the
logits of 4 decode steps bit for bit in eager mode, but not once inductor's CPU backend compiles it (its code for
one token and for several rounds differently). On the GPU, tests/test_decoder_gpu.py holds the compiled paths to
the same bits.
`layer`: the kernels and extern calls of each compiled graph of the target's layer (inductor's output code).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path.cwd()))
import specforge.kernels.cache_attention as ca  # noqa: E402
import specforge.kernels.skinny_linear as sl  # noqa: E402


def emulate() -> None:
    """`serves` true on the CPU for what the GPU serves; the kernels computed in float64, rounded once."""
    if sl.triton is None:
        raise SystemExit("preflight: `import triton` fails, so the custom ops are not defined (see the docstring)")

    max_k = getattr(sl, "max_k", lambda: sl.MAX_K)  # a tree whose kernel can split K serves a longer K

    def serves(x, weight):
        return (x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.dim() == 2
                and weight.is_contiguous() and x.shape[-1] == weight.shape[1] and x.shape[-1] <= max_k()
                and x.numel() <= sl.MAX_ROWS * x.shape[-1] and not sl.batch_invariant.active())

    def kernel(x2, weight, bias, cfg=None, glu=False):
        y = F.linear(x2.double(), weight.double(), None if bias is None else bias.double()).to(x2.dtype)
        if glu:  # GLU_EPILOGUE's output silu(gate) * up of the interleaved halves, rounded as HF's eager MLP
            y = sl._silu_mul_halves(y)
        return y

    @torch.library.custom_op("preflight::cache_attention", mutates_args=())
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: torch.Tensor, local: torch.Tensor,
                  scale: float) -> torch.Tensor:
        return ca.cache_attention_reference(q.double(), k.double(), v.double(), prefix, local, scale).to(q.dtype)

    @attention.register_fake
    def _(q, k, v, prefix, local, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    def norm_kernel(x2, d2, norm_weight, eps, weight, bias, cfg=None, passes=None):  # two passes: HF's roundings
        normed, s = sl._add_norm(x2, d2, norm_weight, eps)
        return kernel(normed, weight, bias), None if d2 is None else s

    sl.serves, sl.skinny_linear_kernel = serves, kernel
    if hasattr(sl, "add_norm_linear_kernel"):  # a tree with the fused add + norm + projection
        sl.add_norm_linear_kernel = norm_kernel
    ca.serves, ca._cache_attention_op = (lambda device, rows: rows <= ca.MAX_ROWS), attention


def counts() -> dict:
    from torch._dynamo.utils import counters

    return {"frames": dict(counters["frames"]), "graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"]}


def decode(out: str | None, temperature: float = 0.0) -> None:
    from specforge.eagle3.decoder import SpecDecoder
    from tests.conftest import tiny_target
    from tests.test_decoder import AUX, PROMPTS, train_draft

    target = tiny_target(seed=3, initializer_range=0.4)
    draft = train_draft(target, norm_output=True)
    target, draft = target.to(torch.bfloat16), draft.to(torch.bfloat16)
    turns = []
    for topk, tokens in ((1, None), (3, 10)):
        dec = SpecDecoder(target, draft, AUX, max_len=160, spec_steps=4, topk=topk, num_draft_tokens=tokens,
                          compile=True, span_step=1024, temperature=temperature)
        for p in PROMPTS:
            got, stats = dec.generate(p, 50)
            turns.append({"topk": topk, "prompt": p, "tokens": got, "accept_lengths": stats.accept_lengths,
                          "plain": dec.generate_plain(p, 50)[0]})
    c = counts()
    print(json.dumps(c))
    if out:
        Path(out).write_text(json.dumps({"turns": turns, "dynamo": c}, indent=1))


@torch.no_grad()
def layer() -> None:
    from torch._inductor import config
    from torch._inductor.graph import GraphLowering

    from specforge.layers import SlotMask
    from specforge.static_target import StaticTarget
    from tests.conftest import tiny_target

    codes = []
    orig = GraphLowering.compile_to_module

    def keep(self, *a, **kw):
        mod = orig(self, *a, **kw)
        codes.append(Path(mod.__file__).read_text())
        return mod

    GraphLowering.compile_to_module = keep
    config.fx_graph_cache = False  # every graph compiled here, so its code is seen
    st = StaticTarget(tiny_target(num_hidden_layers=4).to(torch.bfloat16), [1, 2, 3], max_len=64)
    st.compile()
    n = 0
    for s in (4, 1, 1, 1):  # a prompt, then decode steps: the layer's graphs for several and one token
        toks, pos = torch.randint(0, 200, (1, s)), torch.arange(n, n + s)[None]
        # the decoder's mask: every slot before n, causal among the new rows (cache_attention's form)
        st(toks, pos, pos[0], SlotMask(torch.tensor([n]), torch.ones(s, s, dtype=torch.bool).tril(), 64))
        n += s
    for i, code in enumerate(codes):
        body = code.split("def call(", 1)[1].split("\n        return", 1)[0]
        calls = re.findall(r"^\s+(?:\w+ = )?(cpp_fused_\w+|extern_kernels\.\w+|torch\.ops\.\w+\.\w+)", body, re.M)
        print(f"graph {i}: {len(calls)} calls: {', '.join(re.sub(r'_[0-9]+$', '', c) for c in calls)}")
    print(json.dumps(counts()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["decode", "layer"])
    ap.add_argument("--json", default=None, help="decode: write the turns here")
    ap.add_argument("--temperature", type=float, default=0.0, help="decode: sampled rounds and plain blocks")
    ap.add_argument("--switches-on", action="store_true",
                    help="skinny_linear.FUSE_NORM and GLU_EPILOGUE and static_target.COMPILE_PROLOGUE on (off by "
                         "default until timed)")
    args = ap.parse_args()
    emulate()
    if args.switches_on:
        import specforge.static_target as st

        sl.FUSE_NORM = sl.GLU_EPILOGUE = st.COMPILE_PROLOGUE = True
    decode(args.json, args.temperature) if args.mode == "decode" else layer()


if __name__ == "__main__":
    main()
