"""scripts/aux_scales.py measures the features `fc` reads: its per-token RMS of each aux chunk equals one
computed in float64 from the hidden states transformers returns (state j enters layer j), first token left out."""

import importlib.util
from pathlib import Path

import torch

from specforge.targets import FeatureCapture

from .conftest import tiny_target

spec = importlib.util.spec_from_file_location("aux_scales", Path(__file__).parents[1] / "scripts/aux_scales.py")
aux_scales = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aux_scales)


def test_scales_match_hidden_states_in_float64():
    target = tiny_target(seed=3)
    layers = [0, 2, 5]
    prompts = [[5, 9, 17, 3, 44, 2], [7, 7, 100, 31]]
    got = aux_scales.scales(FeatureCapture(target, layers), prompts, torch.device("cpu"))
    want = []
    with torch.no_grad():
        for ids in prompts:
            hs = target(torch.tensor([ids]), output_hidden_states=True).hidden_states
            want.append(torch.stack([hs[j][0, 1:].double().pow(2).mean(-1).sqrt() for j in layers]))
    want = torch.cat(want, dim=1)
    assert got.shape == (3, 5 + 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_table_shares_are_mean_squares_over_their_sum():
    rms = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 5.0]], dtype=torch.float64)  # mean squares 1, 4, 17
    rows = aux_scales.table([2, 15, 27], rms).splitlines()[2:]
    assert [r.split("|")[5].strip() for r in rows] == ["1.0", "4.0", "17.0"]
    assert [r.split("|")[6].strip() for r in rows] == ["5%", "18%", "77%"]
