"""Static view of the decode kernels' machine code, on any machine with triton (no GPU needed): compiles
`skinny_linear`'s projection kernel, its fused add-norm kernel and its GLU form for sm_90 with the launch
shapes `launch` picks for one decode row, and counts in the SASS its registers, shared memory, its global loads
that are software-pipelined (cp.async, issued stages ahead) and those that are not (each waits a memory round
trip), its MMAs, and its instructions and special-function ops (MUFU: exp, reciprocal) in all. A K loop of
plain loads waits one round trip per step: `add_norm_linear`'s first pass did, which is why its kernel cost
about twice the projection on an H100 (docs/benchmarks.md, 2026-12-05). Timings come from
scripts/bench_decode.py on a GPU.

    python scripts/kernel_sass.py [--shapes 960x576,1536x1536,6144x4096]
"""
import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from specforge.kernels import skinny_linear as sl

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SKINNY = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "part_ptr": "*fp32",
          "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "KS": "i32", "s_xm": "i32", "s_wn": "i32",
          "s_ym": "i32"}
ADD_NORM = {"x_ptr": "*bf16", "d_ptr": "*bf16", "g_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16",
            "y_ptr": "*bf16", "s_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "eps": "fp32", "s_xm": "i32",
            "s_dm": "i32", "s_wn": "i32", "s_ym": "i32", "s_sm": "i32"}


def compile_sm90(fn, sig: dict, const: dict, sizes: dict, warps: int, stages: int):
    """Compile as a launch would: constexprs bound; pointers, strides (decode's rows are contiguous bf16) and
    the `sizes` that are multiples of 16 marked 16-divisible, as triton specialises them at launch."""
    names = list(fn.arg_names)  # the kernel's own order
    full = {n: sig.get(n, "constexpr") for n in names}
    aligned = [n for n, t in sig.items() if t.startswith("*") or n.startswith("s_")]
    aligned += [n for n, v in sizes.items() if v % 16 == 0]
    src = ASTSource(fn=fn, signature=full, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def sass_profile(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True).stdout
    ops = [m.group(1) for m in re.finditer(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)]
    regs = re.search(r"REG:(\d+)", usage)
    return {"regs": int(regs.group(1)) if regs else -1, "smem": kernel.metadata.shared // 1024,
            "async": sum(o.startswith("LDGSTS") for o in ops), "plain": sum(o.startswith("LDG.") for o in ops),
            "mma": sum(o.startswith("HMMA") for o in ops), "instructions": len(ops),
            "mufu": sum(o.startswith("MUFU") for o in ops)}


def decode_kernels(n: int, k: int) -> list[tuple[str, object]]:
    """(name, compiled kernel) for one decode row of an [n, k] weight, with the launch shape `launch` picks:
    the projection, the fused add-norm kernel in two passes and in one, then the projection with silu(gate) * up
    in its epilogue (GLU_EPILOGUE's, for a gate/up weight: n rows interleaving gate and up)."""
    bn, bk, warps, stages, dot, _ = sl.launch(1, n, k, 132)
    common = {"HAS_BIAS": False, "EVEN_K": k % bk == 0, "BLOCK_N": bn, "BLOCK_K": bk}
    kernels = [("projection (`_skinny_kernel`)", compile_sm90(
        sl._skinny_kernel, SKINNY, {**common, "DOT": dot, "SPLIT": 1}, {"N": n, "K": k, "KS": k}, warps, stages))]
    for passes in (2, 1):
        const = {**common, "HAS_DELTA": True, "STAGES1": sl.pass1_stages(k, bk), "ONE_PASS": passes == 1}
        kernels.append((f"add + norm + projection (`_add_norm_kernel`), {passes} pass{'es' if passes > 1 else ''}",
                        compile_sm90(sl._add_norm_kernel, ADD_NORM, const, {"N": n, "K": k}, warps, stages)))
    kernels.append(("projection, silu(gate) * up in its epilogue (`_skinny_kernel`, GLU)", compile_sm90(
        sl._skinny_kernel, SKINNY, {**common, "DOT": dot, "SPLIT": 1, "GLU": True}, {"N": n, "K": k, "KS": k},
        warps, stages)))
    return kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="960x576,3072x576,1536x1536,17920x1536,6144x4096",
                    help="N x K of the weights (SmolLM2 q/k/v, gate/up; Qwen2.5-1.5B; Llama-3.1-8B q/k/v)")
    args = ap.parse_args()
    print("| kernel | N x K | BLOCK_N, BLOCK_K | K steps | regs | shared KiB | cp.async loads (prefetched) "
          "| plain loads | MMAs | instructions | MUFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        bn, bk = sl.launch(1, n, k, 132)[:2]
        for name, kernel in decode_kernels(n, k):
            p = sass_profile(kernel)
            print(f"| {name} | {n} x {k} | {bn}, {bk} | {-(-k // bk)} | {p['regs']} | {p['smem']} | {p['async']} "
                  f"| {p['plain']} | {p['mma']} | {p['instructions']} | {p['mufu']} |")

if __name__ == "__main__":
    main()
