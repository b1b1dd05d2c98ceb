"""Data and tensor parallel training on the CPU: 2 processes (gloo) started by `specforge train --nproc 2`,
checked against one process on the same global batches."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from specforge.config import load_config
from specforge.eagle3.checkpoint import step_folders
from specforge.eagle3.train import train

from .test_train import write_conversations

# 16 conversations, every 5th held out: 13 to train on in batches of 4 (4, 4, 4, 1 rows), so 5 steps cross
# the epoch boundary and meet a batch of one row, which leaves the second dp rank without rows.
ARGS = ["data.eval_every=5", "train.batch_size=4", "train.max_steps=5", "train.ttt_length=3", "train.lr=3e-3",
        "train.warmup_steps=2", "train.save_dtype=float32", "target.draft.draft_vocab_size=512"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("data") / "d.jsonl", n=16)


def _run(folder, data, out, *extra):
    """`specforge train --nproc 2 ...` (through torch.distributed.run, gloo on the CPU)."""
    cmd = [sys.executable, "-m", "specforge", "train", "--nproc", "2", "--target", str(folder), f"out_dir={out}",
           f"data.train_path={data}", *ARGS, *extra]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run


def _result(out):
    losses = json.loads((out / "metrics.json").read_text())["train_losses"]
    return losses, load_file(str(out / "draft" / "model.safetensors"))


def _assert_close(got, want, rtol, weights_atol):
    """Losses to `rtol`; final weights (about 0.02 in size) to an absolute tolerance: Adam divides by the
    gradient's size, which magnifies the rounding of near-zero gradients."""
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want[0]), rtol=rtol, atol=0)
    assert sorted(got[1]) == sorted(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=0, atol=weights_atol, msg=k)


@pytest.mark.parametrize("fused", [True, False])
def test_shares_of_the_global_mean_add_up_to_the_whole_batch(fused):
    """The normalisation data parallel relies on, in one process (float64): each half of a batch divided by
    the whole batch's per-step weight (`step_weights`) gives losses and gradients that sum to the batch's."""
    from specforge.eagle3.ttt import shift_left, soft_labels, step_weights, ttt_loss

    from .conftest import tiny_draft, tiny_target

    target = tiny_target(dtype=torch.float64)
    draft = tiny_draft(target, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 20), generator=g)
    mask = torch.rand(4, 20, generator=g) > 0.3
    aux = torch.randn(4, 20, 192, generator=g, dtype=torch.float64)
    final = torch.randn(4, 20, 64, generator=g, dtype=torch.float64) * 3
    draft_ids = torch.arange(draft.d2t.numel()) + draft.d2t
    labels = soft_labels(final, target.lm_head.weight, draft_ids, shift_left(mask, 1, False))

    def run(rows, denominators=None):
        draft.zero_grad()
        part = type(labels)(labels.logits[rows], labels.lse[rows], labels.argmax[rows])
        loss, _ = draft(ttt_loss, ids[rows], mask[rows], aux[rows], part, 3, fused=fused, denominators=denominators)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in draft.parameters()]

    whole, whole_grads = run(slice(None))
    weights = step_weights(mask, labels, draft.t2d, 3)
    assert torch.equal(run(slice(None), weights)[0], whole)  # its own denominators: the same loss
    (a, ga), (b, gb) = run(slice(0, None, 2), weights), run(slice(1, None, 2), weights)
    torch.testing.assert_close(a + b, whole, rtol=1e-12, atol=0)
    for x, y, w in zip(ga, gb, whole_grads):
        torch.testing.assert_close(x + y, w, rtol=1e-10, atol=1e-14)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_target_folder, data):
    out = tmp_path_factory.mktemp("single")
    train(load_config(str(tiny_target_folder), overrides=[f"out_dir={out}", f"data.train_path={data}", *ARGS]))
    return _result(out)


@pytest.fixture(scope="module")
def dp2(tmp_path_factory, tiny_target_folder, data):
    out = tmp_path_factory.mktemp("dp2")
    run = _run(tiny_target_folder, data, out)
    return out, run


def test_data_parallel_equals_one_process(single, dp2):
    """dp=2 on the same global batches: the same per-step losses and final weights as one process, to float32
    rounding (each rank's loss is its share of the global mean; FSDP's gradient sum is the whole batch's)."""
    out, run = dp2
    assert "x 2 (dp=2, tp=1)" in run.stdout
    assert run.stdout.count("train: draft written to") == 1  # rank 0 alone prints
    _assert_close(_result(out), single, rtol=1e-5, weights_atol=1e-5)
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # and alone writes TensorBoard


def test_data_parallel_with_weight_sums_equals_one_process(tmp_path, tiny_target_folder, data, single):
    """FSDP2 over two ranks with the TTT steps' weight gradients summed in place (train.sum_weight_grads, on by
    default for wide drafts on GPUs, where FSDP shards them): the same losses and weights as one process with
    autograd's sums, to float32 rounding. The sums reach the unsharded weights through autograd, as FSDP's
    gradient reduction expects."""
    _run(tiny_target_folder, data, tmp_path, "train.sum_weight_grads=true")
    _assert_close(_result(tmp_path), single, rtol=1e-5, weights_atol=1e-5)


def test_data_parallel_stop_and_resume_equals_unbroken(tmp_path, tiny_target_folder, data, dp2):
    """dp=2 stopped at step 3 (a sharded checkpoint) and resumed: bitwise the unbroken dp=2 run."""
    out = tmp_path / "run"
    _run(tiny_target_folder, data, out, "train.stop_after=3")
    (ckpt,) = step_folders(out / "checkpoints")
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "train_state.pt",
                                                      "train_state.rank0.pt", "train_state.rank1.pt"]
    run = _run(tiny_target_folder, data, out, "--resume")
    assert "resumed from" in run.stdout
    got, want = _result(out), _result(dp2[0])
    assert got[0] == want[0]
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k
    # A sharded checkpoint resumes only on the mesh that wrote it.
    with pytest.raises(SystemExit, match="saved by a run on 2 processes .*this one runs on 1"):
        train(load_config(str(tiny_target_folder), overrides=[
            f"out_dir={out}", f"data.train_path={data}", *ARGS, f"train.resume={ckpt}"]))


def test_data_parallel_offline_equals_one_process(tmp_path, tiny_target_folder, data, single):
    """Offline (features from a dump, one window holding every shard: the online batches) under dp=2."""
    from specforge.dump import dump_hidden

    dump = tmp_path / "dump"
    dump_hidden(load_config(str(tiny_target_folder), overrides=[
        f"out_dir={tmp_path / 'x'}", f"data.train_path={data}", f"dump.out={dump}", "dump.dtype=float32",
        "dump.shard_tokens=200", "dump.batch_size=3"]))
    out = tmp_path / "run"
    _run(tiny_target_folder, data, out, "train.mode=offline", f"train.hidden={dump}", "train.shuffle_window=100")
    _assert_close(_result(out), single, rtol=1e-5, weights_atol=1e-5)


def test_layout_errors_are_clear(monkeypatch):
    from specforge.parallel.data import check_batch_size
    from specforge.parallel.mesh import Dist, init_distributed

    with pytest.raises(SystemExit, match="train.batch_size=3 is the global batch and must be divisible by the "
                                         "data parallel size 2"):
        check_batch_size(3, Dist(2, 0, 0, 2, 1, 0, 0, torch.device("cpu")))
    cfg = load_config(overrides=["parallel.tp_size=2"])
    with pytest.raises(SystemExit, match="parallel.tp_size=2 needs 2 processes .*--nproc 2"):
        init_distributed(cfg)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="parallel.tp_size=2 does not divide the 3 processes"):
        init_distributed(cfg)


def test_tensor_parallel_target_equals_one_process(tmp_path, tiny_target_folder, data, single):
    """parallel.tp_size=2: the target split over both processes (its features whole on each), the draft
    sharded over both; the same losses as one process, to the rounding of the split matmuls."""
    out = tmp_path / "run"
    run = _run(tiny_target_folder, data, out, "parallel.tp_size=2")
    assert "x 2 (dp=1, tp=2)" in run.stdout
    _assert_close(_result(out), single, rtol=1e-4, weights_atol=1e-3)


@pytest.fixture(scope="module")
def tiny_scout_folder(tmp_path_factory, smol_tokenizer):
    """A Llama-4-Scout-family checkpoint folder in miniature: Llama4ForConditionalGeneration (text weights
    under `language_model.`), MoE layers with a shared expert, chunked attention, a no-rope layer."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = dict(vocab_size=len(smol_tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=32, intermediate_size_mlp=96,
                num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=16,
                no_rope_layers=[1, 1, 1, 0], max_position_embeddings=512, initializer_range=0.2)
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  vision_output_dim=16, image_size=28, patch_size=14, projector_input_dim=16, projector_output_dim=16)
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision,
                                                        architectures=["Llama4ForConditionalGeneration"]))
    folder = tmp_path_factory.mktemp("tiny-scout")
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def test_llama4_scout_preset_runs_end_to_end(tmp_path, tiny_scout_folder, data):
    """`specforge train --target llama4-scout` with the weights in a local folder: one process, then the
    target split over two (tp=2); both train, write a serving checkpoint and give the same losses."""
    args = ["--target", "llama4-scout", f"target.path={tiny_scout_folder}", "target.aux_layer_ids=[1,2,3]",
            "target.draft.intermediate_size=128", "target.draft.num_attention_heads=4",
            "target.draft.num_key_value_heads=2", "target.draft.head_dim=16", f"data.train_path={data}", *ARGS]
    from specforge.cli import main

    main(["train", *args, f"out_dir={tmp_path / 'one'}"])
    config = json.loads((tmp_path / "one" / "draft" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    # The inputs of layers 1, 2, 3, written in SGLang's convention (the outputs of layers 0, 1, 2).
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    # The trained draft against its Llama 4 target in the bench, chain and tree: outputs identical to plain;
    # then the tree bench with the target split over two processes gives the same acceptance, turn by turn.
    bench = [*args, f"out_dir={tmp_path / 'one'}", "bench.limit=2", "bench.max_new_tokens=24"]
    tree = ["--topk", "3", "--num-draft-tokens", "8"]
    for extra in ([], tree):
        main(["bench", *bench, *extra, f"bench.out={tmp_path / 'bench'}"])
        report = json.loads((tmp_path / "bench" / "results.json").read_text())
        assert len(report["turns"]) >= 2 and all(t["identical"] for t in report["turns"])
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "specforge", "bench", "--nproc", "2", *bench, *tree,
                          f"bench.out={tmp_path / 'bench_tp'}"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    split = json.loads((tmp_path / "bench_tp" / "results.json").read_text())
    assert split["settings"]["tensor_parallel"] == 2
    assert [t["accept_lengths"] for t in split["turns"]] == [t["accept_lengths"] for t in report["turns"]]
    assert all(t["identical"] for t in split["turns"])
    run = subprocess.run([sys.executable, "-m", "specforge", "train", "--nproc", "2", *args, "parallel.tp_size=2",
                          f"out_dir={tmp_path / 'tp'}"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    _assert_close(_result(tmp_path / "tp"), _result(tmp_path / "one"), rtol=1e-4, weights_atol=1e-3)
