"""The target under tensor parallelism (TP=2, CPU gloo, two spawned processes) equals the unsplit target.

Tiny random-weight models of real configs (Llama, Qwen3, Qwen3-MoE, Llama 4 as a multimodal
Llama4ForConditionalGeneration folder and as a text-only Llama4ForCausalLM folder) are saved as checkpoint
folders; the unsplit reference comes from targets.load_target in this process, the split one from
load_target_tp in two worker processes that each read only their slices."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from specforge.config import TargetConfig
from specforge.targets import FeatureCapture, decoder_parts, load_target

from .conftest import tiny_llama_config

AUX = [1, 2, 3]
TOL = 1e-4
FAMILIES = ["llama", "qwen3", "qwen3_moe", "llama4", "llama4_text"]
VOCAB = 128


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def _build(family: str):
    from transformers import (Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig,
                              LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.1)
    # Llama 4: chunked attention (chunk 4 < 12 tokens) on rope layers, a no-rope layer with temperature tuning
    # that matters at these lengths, MoE (4 experts + shared expert) mixed with dense layers.
    l4 = dict(common, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
              attention_chunk_size=4, floor_scale=4, attn_scale=0.5)
    if family == "llama":
        return LlamaForCausalLM(tiny_llama_config(**dict(common, intermediate_size=128, tie_word_embeddings=True)))
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, intermediate_size=96, tie_word_embeddings=False,
                                            architectures=["Qwen3ForCausalLM"]))
    if family == "qwen3_moe":  # the checkpoint has per-expert weights (the hub layout)
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32,
                                                  num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                                                  norm_topk_prob=True, architectures=["Qwen3MoeForCausalLM"]))
    if family == "llama4":
        text = dict(l4, interleave_moe_layer_step=2, no_rope_layers=[1, 0, 1, 1])
        vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      vision_output_dim=16, image_size=28, patch_size=14, projector_input_dim=16,
                      projector_output_dim=16)
        return Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision,
                                                           architectures=["Llama4ForConditionalGeneration"]))
    if family == "llama4_text":
        return Llama4ForCausalLM(Llama4TextConfig(**l4, interleave_moe_layer_step=1, no_rope_layer_interval=2,
                                                  use_qk_norm=False, tie_word_embeddings=True,
                                                  architectures=["Llama4ForCausalLM"]))
    raise ValueError(family)


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding on one row
    return ids, mask


def _outputs(model) -> dict:
    ids, mask = _inputs()
    cap = FeatureCapture(model, AUX)
    with torch.no_grad():
        feats = cap.run(ids, mask)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    cap.remove()
    return {"logits": logits, "aux": feats.aux, "final": feats.final, "prenorm": feats.prenorm}


def _diffs(out: dict, ref: dict) -> dict:
    return {k: (out[k] - ref[k]).abs().max().item() for k in ref}


def _check_slices(model, ref_state: dict, rank: int) -> dict:
    """Every parameter equals its cut of the unsplit weights; the sharded ones are half as big."""
    from torch.distributed.tensor import DTensor

    from specforge.parallel.tensor_parallel import shard_spec

    sharded, problems = [], []
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        full = ref_state[name]
        spec = shard_spec(model, name, p)
        if spec is None:
            want = full
        else:
            dim, parts = spec
            size = full.shape[dim] // parts
            n = size // 2
            want = torch.cat([full.narrow(dim, k * size + rank * n, n) for k in range(parts)], dim)
            sharded.append(name)
            if local.numel() * 2 != full.numel():
                problems.append(f"{name}: {tuple(local.shape)} is not half of {tuple(full.shape)}")
        if local.shape != want.shape or not torch.equal(local, want):
            problems.append(f"{name}: holds the wrong slice")
    return {"sharded": sharded, "problems": problems}


# Shapes for `model_shapes.random_target` (registered in the workers): a tied dense Llama and an MoE Llama 4.
RANDOM_SHAPES = {
    "tiny-llama": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       tie_word_embeddings=True),
    "tiny-llama4": dict(model_type="llama4_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                        intermediate_size_mlp=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                        max_position_embeddings=256, tie_word_embeddings=False),
}


def _random_targets(mesh, rank: int) -> dict:
    """A random target built split (each rank materialises only its slices) against the same one built whole."""
    from specforge.model_shapes import SHAPES, random_target

    out = {}
    for name, shape in RANDOM_SHAPES.items():
        res = out[f"random:{name}"] = {}
        try:
            SHAPES[name] = shape
            whole = random_target(name, "cpu", torch.float32, seed=3)
            split = random_target(name, "cpu", torch.float32, seed=3, tp_mesh=mesh)
            res.update(_check_slices(split, whole.state_dict(), rank))
            res["diff"] = _diffs(_outputs(split), _outputs(whole))
        except BaseException:  # noqa: BLE001
            res["error"] = traceback.format_exc()
    return out


def _generated(model) -> list[list[int]]:
    """Greedy and sampled continuations of three prompts of different lengths in one batch."""
    from specforge.generate import Request, generate

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 8, 5)]
    reqs = [Request(p, temperature=t, key=i) for i, (p, t) in enumerate(zip(prompts, (0.0, 1.0, 0.0)))]
    return [out.tokens for out in generate(model, reqs, 10, [], 0, seed=1)]


def _worker(rank: int, workdir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from specforge.parallel.tensor_parallel import load_target_tp, parallelize_target

    torch.set_num_threads(1)
    work = Path(workdir)
    dist.init_process_group("gloo", init_method=f"file://{work / 'rendezvous'}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    results = {}
    for family in FAMILIES:
        res = results[family] = {}
        try:
            folder = work / family
            ref = torch.load(folder / "ref.pt")
            model, tok = load_target_tp(TargetConfig(name=family, path=str(folder)), mesh, torch.device("cpu"),
                                        torch.float32)
            res["tokenizer"] = len(tok)
            res["model_class"] = type(model).__name__
            res["diff"] = _diffs(_outputs(model), ref["out"])
            res.update(_check_slices(model, ref["state"], rank))
            res["requires_grad"] = [n for n, p in model.named_parameters() if p.requires_grad]
            res["params"] = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
            if family == "llama":  # prepare-data's generation runs on the split target too (eagerly)
                res["generated"] = _generated(model)
            if family in ("llama", "llama4"):  # the other entry: split a model that is loaded whole
                whole, _ = load_target(TargetConfig(name=family, path=str(folder)), torch.device("cpu"), torch.float32)
                res["inplace_diff"] = _diffs(_outputs(parallelize_target(whole, mesh)), ref["out"])
        except BaseException:  # noqa: BLE001 (SystemExit included: the tests report it)
            res["error"] = traceback.format_exc()
    results.update(_random_targets(mesh, rank))
    (work / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Folders and unsplit references built here; one two-process run checks every family."""
    work = tmp_path_factory.mktemp("tp")
    tok = _tokenizer()
    for family in FAMILIES:
        torch.manual_seed(0)
        folder = work / family
        _build(family).save_pretrained(folder)
        tok.save_pretrained(folder)
        model, _ = load_target(TargetConfig(name=family, path=str(folder)), torch.device("cpu"), torch.float32)
        torch.save({"out": _outputs(model), "generated": _generated(model) if family == "llama" else None,
                    "state": {k: v.clone() for k, v in model.state_dict().items()},
                    "params": sum(p.numel() for p in model.parameters())}, folder / "ref.pt")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        torch.multiprocessing.spawn(_worker, args=(str(work),), nprocs=2, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return work, [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]


def _result(tp_run, family, rank):
    res = tp_run[1][rank][family]
    assert "error" not in res, res["error"]
    return res


@pytest.mark.parametrize("family", FAMILIES)
def test_split_target_equals_unsplit(tp_run, family):
    for rank in range(2):
        res = _result(tp_run, family, rank)
        assert all(d < TOL for d in res["diff"].values()), (rank, res["diff"])
        assert res["requires_grad"] == []
        assert res["tokenizer"] == VOCAB
    assert _result(tp_run, family, 0)["model_class"].endswith("ForCausalLM")  # Llama 4: the text-only LM


def test_split_target_generates_what_the_unsplit_one_does(tp_run):
    """specforge/generate.py over the static cache of a tensor-parallel target (local heads, eager): every rank
    writes the tokens the whole target writes, greedy and sampled alike."""
    want = torch.load(tp_run[0] / "llama" / "ref.pt")["generated"]
    assert [_result(tp_run, "llama", rank)["generated"] for rank in range(2)] == [want, want]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_rank_holds_only_its_slice(tp_run, family):
    work, _ = tp_run
    full_params = torch.load(work / family / "ref.pt")["params"]
    for rank in range(2):
        res = _result(tp_run, family, rank)
        assert res["problems"] == []
        sharded = res["sharded"]
        assert any(n.endswith("self_attn.q_proj.weight") for n in sharded)
        assert any(n.endswith("o_proj.weight") for n in sharded)
        assert not any("embed_tokens" in n or "lm_head" in n or "norm" in n for n in sharded)
        if family in ("qwen3_moe", "llama4", "llama4_text"):
            assert any(n.endswith("experts.gate_up_proj") for n in sharded)
            assert any(n.endswith("experts.down_proj") for n in sharded)
            assert not any("router" in n or n.endswith("mlp.gate.weight") for n in sharded)
        if family.startswith("llama4"):
            assert any("shared_expert" in n for n in sharded)
        assert res["params"] < full_params


@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_parallelize_a_loaded_target(tp_run, family):
    for rank in range(2):
        res = _result(tp_run, family, rank)
        assert all(d < TOL for d in res["inplace_diff"].values()), (rank, res["inplace_diff"])


@pytest.mark.parametrize("name", list(RANDOM_SHAPES))
def test_random_target_built_split_is_the_whole_ones_slices(tp_run, name):
    """bench_parallel's targets: built split, each rank holds exactly its cut of the same target built whole,
    and computes what the whole one does."""
    for rank in range(2):
        res = _result(tp_run, f"random:{name}", rank)
        assert res["problems"] == []
        assert any(n.endswith("self_attn.q_proj.weight") for n in res["sharded"])
        assert all(d < TOL for d in res["diff"].values()), (rank, res["diff"])


def test_llama4_multimodal_folder_loads_text_only(tp_run):
    """The unsplit path on a Llama4ForConditionalGeneration folder: the text LM, its parts and its head."""
    from specforge.targets import load_target_head, text_config

    folder = tp_run[0] / "llama4"
    cfg = TargetConfig(name="llama4", path=str(folder))
    model, _ = load_target(cfg, torch.device("cpu"), torch.float32)
    embed, layers, norm, lm_head = decoder_parts(model)
    assert type(model).__name__ == "Llama4ForCausalLM" and len(layers) == 4
    head = load_target_head(cfg, torch.device("cpu"), torch.float32)
    assert text_config(head.config).hidden_size == 64
    assert torch.equal(head.embed.weight, embed.weight) and torch.equal(head.lm_head_weight, lm_head.weight)
    assert torch.equal(head.norm.weight, norm.weight)


def test_unknown_family_is_refused():
    from specforge.parallel.tensor_parallel import parallelize_target

    fake = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))
    with pytest.raises(SystemExit, match="no plan for model_type 'gpt2'"):
        parallelize_target(fake, None)


def test_scout_shape_on_meta():
    """The real Scout text shape (about 107.8 B parameters) and its reduced-depth variant."""
    from transformers import AutoModelForCausalLM

    from specforge.model_shapes import shape_config

    cfg = shape_config("llama4-scout")
    assert cfg.model_type == "llama4_text" and cfg.moe_layers == list(range(48))
    assert cfg.no_rope_layers[:4] == [1, 1, 1, 0] and cfg.layer_types[3] == "full_attention"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == "Llama4ForCausalLM"
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - 107.77) < 0.01
    small = shape_config("llama4-scout", num_layers=4)
    assert small.num_hidden_layers == 4 and small.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    assert shape_config("llama3.1-8b", num_layers=2).architectures == ["LlamaForCausalLM"]


def test_maverick_preset():
    from omegaconf import OmegaConf

    from specforge.config import preset_names
    from specforge.targets import default_aux_layers

    assert "llama4-maverick" in preset_names()
    root = Path(__file__).resolve().parents[1] / "configs" / "targets"
    for name, layers in (("llama4-maverick", 48), ("llama4-scout", 48), ("qwen3-8b", 36)):
        t = OmegaConf.load(root / f"{name}.yaml").target
        assert list(t.aux_layer_ids) == default_aux_layers(layers)
