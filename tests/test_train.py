"""The training loop and the CLI, end to end on tiny random-weight targets with the real tokenizer."""

import json
import time

import pytest

from specforge.cli import main
from specforge.config import load_config
from specforge.eagle3.checkpoint import load_draft
from specforge.eagle3.train import train

TOPICS = ["the sea", "a red fox", "prime numbers", "the moon", "bread", "a river", "rain", "chess"]


def write_conversations(path, n=16):
    with open(path, "w") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Tell me about {topic}."},
                {"role": "assistant", "content": f"Here is a short note about {topic}. It is one of many "
                                                 f"things worth knowing, and {topic} appears in stories."}]}) + "\n")
    return path


def test_overfit_loss_falls(tmp_path, tiny_target_folder):
    data = write_conversations(tmp_path / "d.jsonl", n=8)
    cfg = load_config(str(tiny_target_folder), overrides=[
        f"out_dir={tmp_path / 'run'}", f"data.train_path={data}", "data.eval_every=1000",
        "train.max_steps=60", "train.lr=3e-3", "train.warmup_steps=5", "train.batch_size=4",
        "train.ttt_length=3", "target.draft.draft_vocab_size=512"])
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    losses = metrics["train_losses"]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    # Where the run's time went, by stage (no held-out set here: the eval takes next to nothing), and
    # together no more than the call did.
    seconds = metrics["seconds"]
    assert set(seconds) == {"setup", "steps", "eval", "export"}
    assert seconds["setup"] > 0 and seconds["steps"] > 0 and min(seconds.values()) >= 0, seconds
    assert sum(seconds.values()) <= wall + 0.05


def test_tv_weight_reaches_the_loss(tmp_path, tiny_target_folder):
    """train.tv_weight adds the acceptance-aware term to the step's loss (same data, seed and first weights:
    only the loss differs, by a positive amount)."""
    data = write_conversations(tmp_path / "d.jsonl", n=4)
    first = {}
    for tv in (0.0, 0.5):
        cfg = load_config(str(tiny_target_folder), overrides=[
            f"out_dir={tmp_path / f'run{tv}'}", f"data.train_path={data}", "data.eval_every=1000",
            "train.max_steps=1", "train.batch_size=2", "train.ttt_length=2", "target.draft.draft_vocab_size=512",
            f"train.tv_weight={tv}"])
        train(cfg)
        first[tv] = json.loads((tmp_path / f"run{tv}" / "metrics.json").read_text())["train_losses"][0]
    assert first[0.5] > first[0.0]


def test_cli_end_to_end_writes_checkpoint_and_events(tmp_path, tiny_target_folder, capsys):
    """prepare-data (generation by the tiny target), vocab, training, eval, checkpoint, TensorBoard."""
    out = tmp_path / "run"
    main(["train", "--target", str(tiny_target_folder), f"out_dir={out}", "prepare.limit=6",
          "prepare.max_new_tokens=12", "train.max_steps=3", "train.batch_size=2", "data.eval_every=3",
          "train.save_interval=2", "target.draft.draft_vocab_size=1024"])
    prepared = [json.loads(line) for line in (out / "prepared.jsonl").read_text().splitlines()]
    assert len(prepared) == 6 and all(c["messages"][-1]["role"] == "assistant" for c in prepared)
    assert (out / "vocab.safetensors").is_file()
    for ckpt in (out / "draft", out / "checkpoints" / "step_0000002"):
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 1024
        assert (ckpt / "model.safetensors").is_file()
    draft = load_draft(out / "draft")  # loads without the target (no embedding inside): shapes check out
    assert draft.lm_head.weight.shape == (1024, 64)
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/loss_0", "train/acc_6", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "eval/acc_0", "eval/chain_accept_len_5"]:
        assert tag in tags
    assert len(acc.Scalars("train/loss_0")) == 3
    assert "chain acceptance-length estimate" in capsys.readouterr().out


def test_llama4_scout_preset_resolves_and_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = load_config("llama4-scout")
    assert cfg.target.hub_id == "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    assert cfg.target.aux_layer_ids == [2, 24, 45] and cfg.target.draft.intermediate_size == 32768
    with pytest.raises(SystemExit) as e:
        main(["train", "--target", "llama4-scout", "--mode", "online", f"out_dir={tmp_path}"])
    msg = str(e.value)
    assert "llama4-scout" in msg and "not present" in msg and "target.path" in msg


def test_bad_target_and_bad_override():
    with pytest.raises(SystemExit, match="neither a preset"):
        load_config("no-such-model")
    with pytest.raises(SystemExit, match="train.no_such_key|no_such_key"):
        load_config(overrides=["train.no_such_key=1"])
    with pytest.raises(SystemExit, match="train.lr"):
        load_config(overrides=["train.lr=fast"])


def test_bench_cli_writes_reports(tmp_path, tiny_target_folder):
    """Train a moment, then `specforge bench` on two bundled prompts: reports and losslessness."""
    out = tmp_path / "run"
    data = write_conversations(tmp_path / "d.jsonl", n=4)
    main(["train", "--target", str(tiny_target_folder), f"out_dir={out}", f"data.train_path={data}",
          "train.max_steps=2", "target.draft.draft_vocab_size=512", "train.save_dtype=float32"])
    main(["bench", "--target", str(tiny_target_folder), f"out_dir={out}", "--spec-steps", "3",
          "bench.limit=2", "bench.max_new_tokens=12"])
    res = json.loads((out / "bench" / "results.json").read_text())
    overall = res["by_category"]["overall"]
    assert overall["turns"] == 4  # two prompts of two turns each
    assert overall["outputs_differing"] == 0
    assert overall["accept_length"] >= 1.0 and len(overall["accept_rate_by_position"]) == 3
    assert (out / "bench" / "plot.png").stat().st_size > 1000
    assert "| overall |" in (out / "bench" / "results.md").read_text()
    # The deterministic switch through the CLI (tree drafting): the same outputs, recorded in the settings.
    main(["bench", "--target", str(tiny_target_folder), f"out_dir={out}", "--spec-steps", "3", "--topk", "2",
          "--deterministic", "bench.limit=2", "bench.max_new_tokens=12", f"bench.out={out / 'det'}"])
    det = json.loads((out / "det" / "results.json").read_text())
    assert det["settings"]["deterministic"] is True
    assert det["by_category"]["overall"]["outputs_differing"] == 0
    # The sweep: plain once, every chain length estimated, two chains and a tree decoded; the fastest named
    # with its serving flags; every setting's greedy output equal to plain (float32 on the CPU).
    main(["bench", "--target", str(tiny_target_folder), f"out_dir={out}", "--sweep", "bench.limit=2",
          "bench.max_new_tokens=12", "bench.sweep_max_steps=4", "bench.sweep_chains=[1,3]",
          "bench.sweep_trees=['3,2,6']", f"bench.out={out / 'sweep'}"])
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [(r["spec_steps"], r["topk"], r["num_draft_tokens"]) for r in sweep["rows"]] == [(1, 1, 2), (3, 1, 4),
                                                                                             (3, 2, 6)]
    assert all(r["outputs_differing"] == 0 and r["accept_length"] >= 1.0 for r in sweep["rows"])
    assert sorted(sweep["estimated_chain_accept_length"]) == ["1", "2", "3", "4"]
    for r in sweep["rows"][:2]:  # float32 on the CPU: the estimate is what decoding gets
        assert r["estimated_accept_length"] == pytest.approx(r["accept_length"])
    for r in sweep["rows"]:  # a round accepting a tokens accepted its first a - 1 draft positions
        rates = r["accept_rate_by_position"]
        assert len(rates) == r["spec_steps"] and rates == sorted(rates, reverse=True)
        assert 1 + sum(rates) == pytest.approx(r["accept_length"]) and r["ms_per_round"] > 0
    assert sweep["best"] in sweep["rows"]
    assert "--speculative-num-steps" in sweep["serve_flags"][0] and "num_speculative_tokens" in sweep["serve_flags"][1]
    # Sampled, the sweep decodes every setting (rounds on the device, as greedy ones) and gives no chain estimate,
    # which replays greedy rounds.
    main(["bench", "--target", str(tiny_target_folder), f"out_dir={out}", "--sweep", "--temperature", "1.0",
          "bench.limit=1", "bench.max_new_tokens=12", "bench.sweep_chains=[3]", "bench.sweep_trees=['3,2,6']",
          f"bench.out={out / 'sampled'}"])
    sampled = json.loads((out / "sampled" / "sweep.json").read_text())
    assert sampled["estimated_chain_accept_length"] == {}
    assert [r["estimated_accept_length"] for r in sampled["rows"]] == [None, None]
    assert all(r["accept_length"] >= 1.0 for r in sampled["rows"])


def test_compile_defaults_resolve_by_device_and_mode():
    """train.compile and train.compile_target unset: on for one process on a GPU; off on the CPU, under
    train.deterministic (the batch-invariant kernels are not compiled), for the target under tensor parallelism,
    and for the draft under FSDP; a value given is kept as given."""
    import torch

    from specforge.eagle3.train import compiles_draft, compiles_target
    from specforge.parallel.mesh import Dist

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = load_config("smollm2-135m")
    assert cfg.train.compile is None and cfg.train.compile_target is None
    one = Dist(1, 0, 0, 1, 1, 0, 0, gpu)
    assert compiles_draft(cfg, gpu) and compiles_target(cfg, gpu) and compiles_draft(cfg, gpu, one)
    assert not compiles_draft(cfg, cpu) and not compiles_target(cfg, cpu)
    assert not compiles_target(cfg, gpu, Dist(2, 0, 0, 1, 2, 0, 0, gpu))
    assert not compiles_draft(cfg, gpu, Dist(2, 0, 0, 2, 1, 0, 0, gpu))
    det = load_config("smollm2-135m", overrides=["train.deterministic=true"])
    assert not compiles_draft(det, gpu) and not compiles_target(det, gpu)
    given = load_config("smollm2-135m", overrides=["train.compile=false", "train.compile_target=true"])
    assert not compiles_draft(given, gpu) and compiles_target(given, cpu)


def test_defer_reads_resolves_by_device_and_processes():
    """train.defer_reads unset: on for one process on a GPU (also under train.deterministic: it changes no
    kernel), off on the CPU and with several processes; given true with several processes, a clear error."""
    import torch

    from specforge.eagle3.train import defers_reads
    from specforge.parallel.mesh import Dist

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = load_config("smollm2-135m")
    assert cfg.train.defer_reads is None
    assert defers_reads(cfg, gpu) and defers_reads(cfg, gpu, Dist(1, 0, 0, 1, 1, 0, 0, gpu))
    assert defers_reads(load_config("smollm2-135m", overrides=["train.deterministic=true"]), gpu)
    assert not defers_reads(cfg, cpu) and not defers_reads(cfg, gpu, Dist(2, 0, 0, 2, 1, 0, 0, gpu))
    on = load_config("smollm2-135m", overrides=["train.defer_reads=true"])
    assert defers_reads(on, cpu)
    with pytest.raises(SystemExit, match="train.defer_reads=true with several processes"):
        defers_reads(on, gpu, Dist(2, 0, 0, 2, 1, 0, 0, gpu))


def test_sum_weight_grads_resolves_by_device_and_width():
    """train.sum_weight_grads unset: on a GPU for drafts of hidden size 2048 or more (the 8B shape's 4096), off for
    narrower ones (the embedded default's 576), on the CPU and under train.deterministic; given, as given."""
    import torch

    from specforge.eagle3.train import sums_weight_grads

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = load_config("smollm2-135m")
    assert sums_weight_grads(cfg, gpu, 4096) and sums_weight_grads(cfg, gpu, 2048)
    assert not sums_weight_grads(cfg, gpu, 576) and not sums_weight_grads(cfg, cpu, 4096)
    assert not sums_weight_grads(load_config("smollm2-135m", overrides=["train.deterministic=true"]), gpu, 4096)
    assert sums_weight_grads(load_config("smollm2-135m", overrides=["train.sum_weight_grads=true"]), cpu, 576)


def test_clip_in_adamw_resolves_by_device_and_processes():
    """train.clip_in_adamw unset: on where AdamW is fused in one process (a GPU, or deferred reads on the CPU),
    off under train.deterministic, off on the CPU's host-read path and with several processes; given true where
    it cannot run, a clear error."""
    import torch

    from specforge.eagle3.train import clips_in_adamw
    from specforge.parallel.mesh import Dist

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = load_config("smollm2-135m")
    assert clips_in_adamw(cfg, gpu) and not clips_in_adamw(cfg, cpu)
    assert clips_in_adamw(load_config("smollm2-135m", overrides=["train.defer_reads=true"]), cpu)
    assert not clips_in_adamw(load_config("smollm2-135m", overrides=["train.deterministic=true"]), gpu)
    assert not clips_in_adamw(cfg, gpu, Dist(2, 0, 0, 2, 1, 0, 0, gpu))
    on = load_config("smollm2-135m", overrides=["train.clip_in_adamw=true"])
    with pytest.raises(SystemExit, match="train.clip_in_adamw=true with several processes"):
        clips_in_adamw(on, gpu, Dist(2, 0, 0, 2, 1, 0, 0, gpu))
    with pytest.raises(SystemExit, match="train.clip_in_adamw=true needs fused AdamW"):
        clips_in_adamw(on, cpu)


@pytest.mark.parametrize("scale", [3.0, 0.01], ids=["clipped", "under the limit"])
def test_clip_in_adamw_updates_as_clip_grad_norm(scale):
    """Fused AdamW dividing the gradients by `grad_scale` (clip_gradients(in_adamw=True)) takes the step of
    clip_grad_norm_ then AdamW: the same norm, float32 weights and moments equal to rounding when the norm is
    clipped (the factor travels in float32, as fused AdamW reads it), bit for bit when it is under the limit (the
    factor is 1 both ways)."""
    import torch

    from specforge.eagle3.train import clip_gradients

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in ((7, 5), (11,), (3, 4, 2))]
    grads = [scale * torch.randn(p.shape, generator=gen) for p in init]
    result = {}
    for in_adamw in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, fused=True)
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            norm = clip_gradients(opt, params, 0.5, in_adamw)
            opt.step()
        result[in_adamw] = norm, [p.detach() for p in params], [opt.state[p]["exp_avg_sq"] for p in params]
    (n0, p0, v0), (n1, p1, v1) = result[False], result[True]
    assert torch.equal(n0, n1) and (n0 > 0.5) == (scale > 1)
    for a, b in zip(p0 + v0, p1 + v1):
        if scale > 1:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)  # float32 rounding, through Adam's ratio
        else:
            assert torch.equal(a, b)
