"""The training loop on a GPU: host reads one step late (train.defer_reads, the GPU default) train exactly as
the host-decided path, and a non-finite step's update is skipped on the device by fused AdamW's found_inf.
Skipped without CUDA."""

import json

import pytest
import torch
from safetensors.torch import load_file

from specforge.config import load_config
from specforge.eagle3.checkpoint import load_draft
from specforge.eagle3.train import set_deterministic, train

from .test_resume import (_assert_same, _cfg, _result, data, nan_target_folder,  # noqa: F401 (fixtures)
                          stop_after_three_nonfinite)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_deferred_reads_train_as_the_host_path_bit_for_bit(tmp_path, tiny_target_folder, data):  # noqa: F811
    """Deterministic kernels, so two runs compare bitwise: deferred (found_inf = 0 at every step) and
    host-decided reads give the same losses and weights."""
    runs = {}
    try:
        for defer in ("true", "false"):
            out = tmp_path / defer
            train(_cfg(tiny_target_folder, data, out, "device=cuda", "train.deterministic=true",
                       f"train.defer_reads={defer}"))
            runs[defer] = _result(out)
    finally:
        set_deterministic(False)
    _assert_same(runs["true"], runs["false"])


def test_nonfinite_steps_skip_on_the_device(tmp_path, nan_target_folder, data):  # noqa: F811
    out = tmp_path / "run"
    train(load_config(str(nan_target_folder), overrides=[
        f"out_dir={out}", f"data.train_path={data}", "data.eval_every=0", "train.batch_size=2",
        "train.max_steps=7", "train.ttt_length=2", "target.draft.draft_vocab_size=512", "device=cuda"]))
    metrics = json.loads((out / "metrics.json").read_text())
    bad = [x for x in metrics["train_losses"] if x != x]
    assert metrics["nonfinite_steps"] == len(bad) and 1 <= len(bad) <= 2
    weights = load_file(str(out / "draft" / "model.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_repeated_nonfinite_steps_stop_one_step_late(tmp_path, nan_target_folder):  # noqa: F811
    ckpt = stop_after_three_nonfinite(tmp_path, nan_target_folder, "device=cuda")
    assert ckpt.name == "step_0000004"
    assert all(torch.isfinite(p).all() for p in load_draft(ckpt).parameters())


def test_online_features_wait_for_nothing_on_the_host():
    """A right-padded batch's target forward (OnlineFeatures, as training runs it) makes no host read: under
    CUDA's sync debug mode "error" any wait for the GPU raises. The features equal the masked forward's at the
    real tokens."""
    from specforge.data.batching import collate
    from specforge.data.template import Sample
    from specforge.eagle3.train import OnlineFeatures
    from specforge.targets import FeatureCapture

    from .conftest import tiny_target

    target = tiny_target().cuda()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 256, (n,), generator=g) for n in (16, 9)]
    batch = collate([Sample(r, torch.ones(len(r), dtype=torch.bool)) for r in rows]).to("cuda")
    features = OnlineFeatures(target, [2, 4, 5])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        aux, final = features(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    features.close()
    capture = FeatureCapture(target, [2, 4, 5])
    masked = capture.run(batch.input_ids, batch.attention_mask)
    capture.remove()
    for i, r in enumerate(rows):
        n = len(r)
        torch.testing.assert_close(aux[i, :n], masked.aux[i, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final[i, :n], masked.final[i, :n], rtol=1e-5, atol=1e-5)
