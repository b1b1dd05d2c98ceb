"""How large each of the draft's three input features is, per token, before `fc` mixes them.

EAGLE-3's `fc` reads the concatenated hidden states entering three target layers (`target.aux_layer_ids`).
Where their scales differ widely, `fc` first reads mostly the largest, and EAGLE 3.1's `fc_norm` (an RMSNorm
per chunk) evens them out; this prints the per-token RMS of each chunk and its share of the squared norm of
`fc`'s input, over the prompt tokens of real prompts (the first token, an attention sink, left out).

  python scripts/aux_scales.py --config configs/recipes/smollm2-gpu.yaml --limit 20
  python scripts/aux_scales.py --target qwen2.5-coder-1.5b --prompts my_prompts.jsonl

Runs on the CPU (float32) or a GPU. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specforge.config import load_config  # noqa: E402
from specforge.data.conversations import bundled_path  # noqa: E402
from specforge.data.tables import read_prompts  # noqa: E402
from specforge.data.template import ensure_chat_template, prompt_ids  # noqa: E402
from specforge.targets import FeatureCapture, aux_layer_ids, load_target  # noqa: E402


def chunk_rms(aux: torch.Tensor) -> torch.Tensor:
    """[T, 3H] concatenated features -> [3, T] per-token RMS of each layer's chunk, in float64."""
    return torch.stack([c.double().pow(2).mean(-1).sqrt() for c in aux.chunk(3, dim=-1)])


def scales(capture: FeatureCapture, prompts: list[list[int]], device) -> torch.Tensor:
    """[3, tokens] per-token RMS of each aux chunk over every prompt's tokens but the first."""
    out = []
    for ids in prompts:
        f = capture.run(torch.tensor([ids], device=device))
        out.append(chunk_rms(f.aux[0, 1:]))
    return torch.cat(out, dim=1)


def table(layer_ids: list[int], rms: torch.Tensor) -> str:
    energy = rms.pow(2).mean(dim=1)
    share = energy / energy.sum()
    lines = ["| aux layer | RMS median | p10 | p90 | mean square | share of fc's input |", "|---|---|---|---|---|---|"]
    for j, r, e, s in zip(layer_ids, rms, energy, share):
        lines.append(f"| {j} | {r.median():.2f} | {r.quantile(0.1):.2f} | {r.quantile(0.9):.2f} | {e:.1f} "
                     f"| {100 * s:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a YAML config (e.g. a recipe)")
    ap.add_argument("--target", default=None, help="a preset or checkpoint folder")
    ap.add_argument("--prompts", default=None, help="JSONL prompts (default: the bundled bench prompts)")
    ap.add_argument("--limit", type=int, default=20, help="the first n prompts (their first user turns)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()
    cfg = load_config(args.target, args.config, args.overrides)
    device = torch.device(args.device)
    target, tok = load_target(cfg.target, device, torch.float32)
    ensure_chat_template(tok, cfg.data.chat_template)
    layer_ids = aux_layer_ids(cfg.target, target)
    path = args.prompts or str(bundled_path("bench_prompts.jsonl"))
    convs = read_prompts(path, cfg.data, "--prompts")[: args.limit]
    prompts = [prompt_ids(tok, [{"role": "user", "content": c.user_turns()[0]}]) for c in convs]
    rms = scales(FeatureCapture(target, layer_ids), prompts, device)
    print(f"{cfg.target.name}: the first user turns of {len(prompts)} prompts from {path}, "
          f"{rms.shape[1]} tokens\n")
    print(table(layer_ids, rms))


if __name__ == "__main__":
    main()
