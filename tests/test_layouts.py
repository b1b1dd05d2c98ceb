"""Draft layouts as the engines read them, and as the ecosystem publishes them.

The engines' rules for the aux layers, written out here from their code (checked 2026-11):
- SGLang: `ModelRunner.__init__` (python/sglang/srt/model_executor/model_runner.py) reads the draft's
  `hf_config.eagle_config["eagle_aux_hidden_state_layer_ids"]` (None when the key or `eagle_config` is absent)
  and hands it to `LlamaForCausalLM.set_eagle3_layers_to_capture` (python/sglang/srt/models/llama.py): None
  -> `[2, N // 2, N - 3]`, else `[id + 1 for id in ids]`; `LlamaModel.forward` then appends
  `hidden_states + residual` before running layer i for each i in `layers_to_capture`, i.e. the input of layer i.
- vLLM: a speculators config becomes the draft's hf config in `update_eagle3`
  (vllm/transformers_utils/configs/speculators/algos.py), which copies the top-level
  `eagle_aux_hidden_state_layer_ids` when set; `set_eagle3_aux_hidden_state_layers` /
  `get_eagle3_aux_layers_from_config` (vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py; in older
  versions vllm/v1/worker/gpu_model_runner.py) take them as they are, else the target's
  `get_eagle3_aux_hidden_state_layers()` = `(2, N // 2, N - 3)`; `LlamaModel.forward`
  (vllm/model_executor/models/llama.py) appends `hidden_states + residual` before layer idx for idx in
  `aux_hidden_state_layers`: the input of layer idx.
- speculators: `resolve_target_layer_ids` (speculators/models/utils.py): the ids as written, None ->
  `[2, N // 2, N - 3]` of the verifier's config; its datagen captures the input of layer id (id N: the last
  layer's output).
Our ids are HF hidden-state indices: id j is the input of layer j. So the layers each engine captures must be
our ids, listed as inputs."""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from specforge.cli import main
from specforge.config import TargetConfig
from specforge.eagle3.checkpoint import load_draft, save_draft
from specforge.eagle3.ttt import shift_left, ttt_unroll
from specforge.targets import load_target, load_target_head

from .conftest import tiny_draft, tiny_target
from .test_train import write_conversations


# One AdamW step on two short conversations, no held-out evaluation, float32 weights out.
QUICK = ["train.max_steps=1", "train.batch_size=2", "train.ttt_length=2", "train.warmup_steps=1",
         "data.eval_every=1000", "train.save_dtype=float32"]


def sglang_captures(config: dict, n: int) -> list[int]:
    """Inputs of the layers SGLang captures for a LlamaForCausalLMEagle3 draft (see the module docstring)."""
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return [2, n // 2, n - 3] if ids is None else [i + 1 for i in ids]


def vllm_captures(config: dict, n: int) -> list[int]:
    """Inputs of the layers vLLM captures for a speculators-layout draft."""
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    return list(ids) if ids else [2, n // 2, n - 3]


def speculators_captures(config: dict, n: int) -> list[int]:
    """Inputs of the layers the speculators library reads for its Eagle3 config."""
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    return [2, n // 2, n - 3] if ids is None else list(ids)


def tiny_head(folder):
    """The tiny target's embedding (and head), float32 on the CPU."""
    return load_target_head(TargetConfig(name="tiny", path=str(folder)), torch.device("cpu"), torch.float32)


def ttt_logits(draft, ids, aux, steps=3):
    with torch.no_grad():
        return [draft.logits(h) for _, h in ttt_unroll(draft, ids, aux, steps, attention="reference")]


def assert_same_logits(a, b, ids, aux):
    for x, y in zip(ttt_logits(a, ids, aux), ttt_logits(b, ids, aux)):
        assert torch.equal(x, y)


def random_norms(draft, seed=0):
    """Norm weights other than ones, so that a norm read from the wrong tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return draft


def rounded(draft, dtype):
    """The draft with its weights rounded to `dtype` (what a checkpoint stored in it holds)."""
    out = copy.deepcopy(draft)
    out.set_embed_tokens(draft.embed_tokens)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).float())
    return out


@pytest.mark.parametrize("custom", [False, True], ids=["default-layers", "custom-layers"])
def test_every_engine_captures_the_trained_layers(tmp_path, tiny_target_folder, custom):
    """Train a moment (both layouts written), re-export each with `specforge export`, and read every config
    the way its engine does: each captures exactly the layers the draft was trained on."""
    n = 8  # the tiny target's depth
    trained = [1, 3, 6] if custom else [2, n // 2, n - 3]
    out = tmp_path / "run"
    data = write_conversations(tmp_path / "d.jsonl", n=2)
    main(["train", "--target", str(tiny_target_folder), f"out_dir={out}", f"data.train_path={data}", *QUICK,
          "target.draft.draft_vocab_size=512", "train.export_format=both",
          *(["target.aux_layer_ids=[1,3,6]"] if custom else [])])
    main(["export", "--format", "speculators", str(out / "draft"), str(tmp_path / "to-spec")])
    main(["export", "--format", "sglang", str(out / "draft-speculators"), str(tmp_path / "to-sglang")])
    main(["export", "--format", "speculators", "--target", str(tiny_target_folder), str(out / "draft"),
          str(tmp_path / "to-spec-checked")])
    sglang = [out / "draft", tmp_path / "to-sglang"]
    speculators = [out / "draft-speculators", tmp_path / "to-spec", tmp_path / "to-spec-checked"]
    for folder in sglang:
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLMEagle3"]
        assert sglang_captures(config, n) == trained, folder
        # Default layers are written as none: then any engine reading any field takes the defaults.
        assert ("eagle_aux_hidden_state_layer_ids" in config["eagle_config"]) == custom
    for folder in speculators:
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["Eagle3Speculator"]
        assert vllm_captures(config, n) == trained, folder
        assert speculators_captures(config, n) == trained, folder
    assert json.loads((tmp_path / "to-spec-checked" / "config.json").read_text())["speculators_config"][
        "verifier"]["name_or_path"] == str(tiny_target_folder.resolve())
    # Every folder is the same draft: identical logits (float32 weights).
    embed = tiny_head(tiny_target_folder).embed
    reference = load_draft(out / "draft", embed, num_target_layers=n)
    assert reference.config.eagle_aux_hidden_state_layer_ids == trained
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (1, 12))
    aux = torch.randn(1, 12, 3 * 64)
    for folder in sglang[1:] + speculators:
        again = load_draft(folder, embed, num_target_layers=n)
        assert again.config.eagle_aux_hidden_state_layer_ids == trained
        assert_same_logits(reference, again, ids, aux)


@pytest.mark.parametrize("flags", [{}, {"fc_norm": True, "norm_output": True}], ids=["eagle3", "eagle3.1"])
@pytest.mark.parametrize("layout", ["sglang", "speculators"])
def test_round_trip_each_layout(tmp_path, layout, flags):
    target = tiny_target()
    draft = random_norms(tiny_draft(target, **flags))
    draft.config.eagle_aux_hidden_state_layer_ids = [1, 3, 6]
    save_draft(draft, tmp_path / "d", torch.float32, layout=layout)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    for flag in ("fc_norm", "norm_output"):  # under the names the speculators config uses
        assert config.get(flag, False) == flags.get(flag, False)
    again = load_draft(tmp_path / "d", target.model.embed_tokens, num_target_layers=8)
    assert again.config.eagle_aux_hidden_state_layer_ids == [1, 3, 6]
    assert (again.fc_norm is not None, again.norm_output) == (bool(flags), bool(flags))
    torch.manual_seed(0)
    ids, aux = torch.randint(0, 256, (2, 10)), torch.randn(2, 10, 192)
    assert_same_logits(draft, again, ids, aux)


def _llama_fields(c) -> dict:
    return {"model_type": "llama", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "num_hidden_layers": 1, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings, "rope_theta": c.rope_parameters["rope_theta"],
            "initializer_range": 0.02, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2}


def write_published(kind: str, draft, folder, ids=None):
    """`draft` as `kind` publishes it, written here from its weights (not by specforge): returns the dtype the
    weights are stored in. `ids`: our aux ids, written in the publisher's convention (None: default layers)."""
    folder.mkdir(parents=True)
    c = draft.config
    sd = {k: v.detach().clone() for k, v in draft.state_dict().items()}
    full_vocab = c.draft_vocab_size == c.vocab_size
    if kind == "specforge":  # SGLang's layout as SpecForge writes it: ids always, in SGLang's convention
        config = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_fields(c), "head_dim": c.head_dim,
                  "draft_vocab_size": c.draft_vocab_size, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                  "pad_token_id": 0, "transformers_version": "4.51.0",
                  "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids or [2, 4, 5]],
                                   "use_aux_hidden_state": True}}
        dtype, weights = torch.bfloat16, "safetensors"
    elif kind == "angelslim":  # AngelSlim: the misspelt architecture, tied flag, float16 pytorch_model.bin
        config = {"architectures": ["LlamaForCausalLMEEagle3"], **_llama_fields(c), "head_dim": c.head_dim,
                  "draft_vocab_size": c.draft_vocab_size, "tie_word_embeddings": True, "torch_dtype": "float16"}
        dtype, weights = torch.float16, "bin"
    elif kind == "eagle":  # the EAGLE repository: no ids, no head_dim, float16 pytorch_model.bin
        config = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_fields(c),
                  "draft_vocab_size": c.draft_vocab_size, "tie_word_embeddings": False, "torch_dtype": "float16",
                  "transformers_version": "4.28.1"}
        dtype, weights = torch.float16, "bin"
    elif kind == "tied":  # a full-vocabulary draft whose head is the target's embedding (no lm_head.weight)
        config = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_fields(c), "tie_word_embeddings": True,
                  "torch_dtype": "bfloat16"}
        sd.pop("lm_head.weight")
        dtype, weights = torch.bfloat16, "safetensors"
    elif kind == "speculators":  # the speculators library's Eagle3SpeculatorConfig and tensor names
        layer = {k: v for k, v in _llama_fields(c).items() if k != "rope_theta"}
        layer.update(head_dim=c.head_dim, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                     rope_parameters=dict(c.rope_parameters))
        config = {"architectures": ["Eagle3Speculator"], "auto_map": {"": "config.Eagle3SpeculatorConfig"},
                  "speculators_model_type": "eagle3", "speculators_version": "0.9.0", "transformer_layer_config": layer,
                  "draft_vocab_size": c.draft_vocab_size, "target_hidden_size": None,
                  "eagle_aux_hidden_state_layer_ids": ids, "norm_before_residual": False, "norm_before_fc": False,
                  "fc_norm": bool(getattr(c, "fc_norm", False)), "norm_output": bool(getattr(c, "norm_output", False)),
                  "embed_requires_grad": False,
                  "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                         "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3,
                                                               "accept_tolerance": 0.0, "verifier_accept_k": 1}],
                                         "verifier": {"architectures": ["LlamaForCausalLM"], "name_or_path": None}}}
        sd = {k.replace("midlayer.", "layers.0."): v for k, v in sd.items()}
        dtype, weights = torch.bfloat16, "safetensors"
    else:
        raise ValueError(kind)
    sd = {k: v for k, v in sd.items() if not k.startswith("rotary_emb")}
    if full_vocab:  # publishers of full-vocabulary drafts leave the identity maps out
        sd.pop("d2t")
        sd.pop("t2d")
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if weights == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return dtype


PUBLISHED = {  # kind: (draft vocab, aux ids (ours), EAGLE 3.1 flags)
    "specforge": (64, [1, 3, 6], {}),
    "angelslim": (64, None, {}),
    "eagle": (256, None, {}),
    "tied": (256, None, {}),
    "speculators": (64, [1, 3, 6], {"fc_norm": True, "norm_output": True}),
}


@pytest.mark.parametrize("kind", list(PUBLISHED))
def test_published_drafts_load_and_export(tmp_path, kind):
    """A draft as each publisher writes it loads with identical logits to the weights it was written from,
    its aux layers mapped to ours; exported to either layout and read back, it stays the same draft."""
    vocab, ids, flags = PUBLISHED[kind]
    target = tiny_target()
    draft = random_norms(tiny_draft(target, draft_vocab=vocab, **flags))
    if vocab == 256:
        draft.set_vocab(torch.zeros(256, dtype=torch.long), torch.ones(256, dtype=torch.bool))
    if kind == "tied":
        with torch.no_grad():
            draft.lm_head.weight.copy_(target.model.embed_tokens.weight)
    dtype = write_published(kind, draft, tmp_path / kind, ids)
    loaded = load_draft(tmp_path / kind, target.model.embed_tokens, num_target_layers=8)
    assert loaded.config.eagle_aux_hidden_state_layer_ids == (ids or [2, 4, 5])
    torch.manual_seed(0)
    tok, aux = torch.randint(0, 256, (2, 10)), torch.randn(2, 10, 192)
    start = rounded(draft, dtype)
    if kind == "tied":  # the head is the target's embedding itself, not a stored copy
        with torch.no_grad():
            start.lm_head.weight.copy_(target.model.embed_tokens.weight)
    assert_same_logits(start, loaded, tok, aux)
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)
    checked = []
    if kind == "tied":  # its head is the target's embedding: export needs the target
        with pytest.raises(SystemExit, match="tie_word_embeddings=true and no lm_head.weight: the head is the "
                                             "target's embedding, so load the draft with its target"):
            main(["export", "--format", "sglang", str(tmp_path / kind), str(tmp_path / "no-target")])
        target.save_pretrained(tmp_path / "target")
        checked = ["--target", str(tmp_path / "target")]
    for layout in ("sglang", "speculators"):
        main(["export", "--format", layout, *checked, str(tmp_path / kind), str(tmp_path / f"{kind}-{layout}")])
        again = load_draft(tmp_path / f"{kind}-{layout}", target.model.embed_tokens, num_target_layers=8)
        assert again.config.eagle_aux_hidden_state_layer_ids == (ids or [2, 4, 5])
        assert again.fc.weight.dtype == torch.float32
        assert_same_logits(rounded(loaded, dtype), again, tok, aux)


@pytest.mark.parametrize("kind", ["specforge", "angelslim", "eagle", "speculators"])
def test_fine_tune_from_a_published_draft(tmp_path, tiny_target_folder, kind):
    """train.init_from with a draft in each foreign layout: one AdamW step at lr 1e-3 moves every weight by at
    most the learning rate, so a run whose weights end within 1e-3 of the published ones (and not on them)
    loaded them whole, layers, vocabulary maps and EAGLE 3.1 norms included, and trained them."""
    target, _ = load_target(TargetConfig(name="tiny", path=str(tiny_target_folder)), torch.device("cpu"))
    _, ids, flags = PUBLISHED[kind]
    draft = random_norms(tiny_draft(target, draft_vocab=512, **flags))
    dtype = write_published(kind, draft, tmp_path / kind, ids)
    data = write_conversations(tmp_path / "d.jsonl", n=2)
    main(["train", "--target", str(tiny_target_folder), f"data.train_path={data}", *QUICK, "train.lr=1e-3",
          "train.mask_out_of_vocab=false", f"train.init_from={tmp_path / kind}", "train.export_format=speculators",
          "target.draft.draft_vocab_size=512", f"out_dir={tmp_path / 'run'}",
          *([f"target.aux_layer_ids=[{','.join(map(str, ids))}]"] if ids else [])])
    tuned = load_draft(tmp_path / "run" / "draft", target.model.embed_tokens, num_target_layers=8)
    assert tuned.config.eagle_aux_hidden_state_layer_ids == (ids or [2, 4, 5])
    assert (tuned.fc_norm is not None, tuned.norm_output) == (bool(flags), bool(flags))
    start = rounded(draft, dtype).state_dict()
    assert start.keys() == tuned.state_dict().keys()
    for name, w in tuned.state_dict().items():
        if w.is_floating_point():
            assert (w - start[name]).abs().max() <= 1.001e-3, name
        else:
            assert torch.equal(w, start[name]), name
    assert not torch.equal(tuned.fc.weight, start["fc.weight"])


def test_a_run_with_other_layers_refuses_the_draft(tmp_path, tiny_target_folder):
    draft = tiny_draft(tiny_target(vocab_size=49152))
    write_published("specforge", draft, tmp_path / "d", [1, 3, 6])
    data = write_conversations(tmp_path / "d.jsonl", n=4)
    with pytest.raises(SystemExit, match=r"reads the hidden states entering target layers \[1, 3, 6\] "
                                         r"\(eagle_config.eagle_aux_hidden_state_layer_ids=\[0, 2, 5\] in its "
                                         r"config.json\), but this run captures \[2, 4, 5\]; set "
                                         r"target.aux_layer_ids=\[1, 3, 6\]"):
        main(["train", "--target", str(tiny_target_folder), f"data.train_path={data}", "train.max_steps=1",
              f"train.init_from={tmp_path / 'd'}", f"out_dir={tmp_path / 'run'}"])


def test_drafts_that_do_not_fit_are_named(tmp_path):
    target = tiny_target()
    embed = target.model.embed_tokens
    draft = tiny_draft(target)

    def published(name, edit=None, ids=None, kind="speculators"):
        write_published(kind, draft, tmp_path / name, ids)
        if edit:
            config = json.loads((tmp_path / name / "config.json").read_text())
            edit(config)
            (tmp_path / name / "config.json").write_text(json.dumps(config))
        return tmp_path / name

    deep = published("deep", ids=[2, 4, 8])
    with pytest.raises(SystemExit, match=f"{deep}: eagle_aux_hidden_state_layer_ids=\\[2, 4, 8\\] in config.json "
                                         "\\(the inputs of those layers\\), but the target has 8 layers"):
        load_draft(deep, embed, num_target_layers=8)
    wide = published("wide")
    with pytest.raises(SystemExit, match=f"{wide}: transformer_layer_config.hidden_size=64 in config.json, but the "
                                         "target's hidden size is 32"):
        load_draft(wide, torch.nn.Embedding(256, 32))
    with pytest.raises(SystemExit, match=f"{wide}: transformer_layer_config.vocab_size=256 in config.json, but the "
                                         "target's vocabulary has 300 tokens"):
        load_draft(wide, torch.nn.Embedding(300, 64))
    arch = published("arch", lambda c: c.update(architectures=["Qwen3ForCausalLMEagle3"]), kind="specforge")
    with pytest.raises(SystemExit, match=f"{arch / 'config.json'}: architectures=\\['Qwen3ForCausalLMEagle3'\\]; "
                                         "an EAGLE-3 draft is one of LlamaForCausalLMEagle3"):
        load_draft(arch, embed)
    qwen = published("qwen", lambda c: c["transformer_layer_config"].update(model_type="qwen3"))
    with pytest.raises(SystemExit, match="transformer_layer_config.model_type='qwen3'; only Llama draft layers"):
        load_draft(qwen, embed)
    gptoss = published("gptoss", lambda c: c.update(norm_before_fc=True))
    with pytest.raises(SystemExit, match=f"{gptoss / 'config.json'}: norm_before_fc=true is not supported"):
        load_draft(gptoss, embed)
    # The same numbers at both places mean different layers: SGLang's [0, 2, 5] are the inputs of 1, 3, 6.
    both = published("both", lambda c: c.update(eagle_aux_hidden_state_layer_ids=[0, 2, 5]), ids=[1, 3, 6],
                     kind="specforge")
    with pytest.raises(SystemExit, match="eagle_aux_hidden_state_layer_ids=\\[0, 2, 5\\] \\(vLLM: inputs of those "
                                         "layers\\) name different layers"):
        load_draft(both, embed)
    no_map = published("no-map", kind="eagle")  # the draft has 64 tokens: the maps cannot be left out
    weights = torch.load(no_map / "pytorch_model.bin")
    del weights["d2t"], weights["t2d"]
    torch.save(weights, no_map / "pytorch_model.bin")
    with pytest.raises(SystemExit, match=f"{no_map}: draft_vocab_size=64 < vocab_size=256, but the checkpoint has "
                                         "no d2t or t2d"):
        load_draft(no_map, embed)


def test_speculators_library_reads_our_export(tmp_path, tiny_target_folder, capsys):
    """The speculators library's own config and model classes load our speculators-layout export (the target
    folder as its verifier, whose embedding it loads) and its TTT forward gives our logits at every step.
    Its forward returns only argmax tokens, so the logits are read from its lm_head's output."""
    pytest.importorskip("speculators", reason="installed by scripts/setup.sh (--no-deps)")
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    head = tiny_head(tiny_target_folder)
    worst = 0.0
    for name, vocab, ids, flags in [("eagle3-full-vocab", 49152, None, {}),
                                    ("eagle3.1-custom-layers", 512, [1, 3, 6], {"fc_norm": True, "norm_output": True})]:
        draft = random_norms(tiny_draft(tiny_target(vocab_size=49152), draft_vocab=vocab, **flags))
        draft.set_embed_tokens(head.embed)
        if vocab == 49152:
            draft.set_vocab(torch.zeros(vocab, dtype=torch.long), torch.ones(vocab, dtype=torch.bool))
        if ids:
            draft.config.eagle_aux_hidden_state_layer_ids = ids
        folder = save_draft(draft, tmp_path / name, torch.float32, layout="speculators",
                            verifier={"name_or_path": str(tiny_target_folder), "architectures": ["LlamaForCausalLM"]})
        config = Eagle3SpeculatorConfig.from_pretrained(folder)
        config.transformer_layer_config._attn_implementation = "eager"  # flex attention's block masks need a GPU
        with warnings.catch_warnings():  # without ids it warns that it takes the default layers
            warnings.simplefilter("ignore")
            theirs = Eagle3DraftModel.from_pretrained(folder, config=config, dtype=torch.float32).eval()
        # Its loader fills missing weights with uninitialised memory under this transformers, so it would keep
        # that for the embedding: its own verifier loader is asked to read the target's (our export has none).
        theirs._load_verifier_weights(overwrite_embed_tokens=True)
        assert theirs.target_layer_ids == (ids or [2, 4, 5])
        assert (theirs.fc_norm is not None, theirs.config.norm_output) == (bool(flags), bool(flags))
        t, steps = 16, 4
        g = torch.Generator().manual_seed(1)
        tok = torch.randint(0, 49152, (1, t), generator=g)
        aux = torch.randn(1, t, 3 * 64, generator=g) * torch.tensor([1.0, 4.0, 20.0]).repeat_interleave(64)
        logits = []
        hook = theirs.lm_head.register_forward_hook(lambda m, i, o: logits.append(o))
        with torch.no_grad():  # their step k embeds the tokens shifted by k (ours by k + 1): give it ours shifted
            theirs(hidden_states=aux, input_ids=shift_left(tok, 1), document_ids=torch.zeros(1, t, dtype=torch.long),
                   position_ids=torch.arange(t)[None], ttt_steps=steps)
        hook.remove()
        ours = ttt_logits(draft, tok, aux, steps)
        assert len(logits) == steps
        for k in range(steps):
            valid = t - 1 - k  # positions whose input token exists at step k
            diff = (logits[k][:, :valid] - ours[k][:, :valid]).abs().max().item()
            worst = max(worst, diff)
            assert diff < 1e-4 * max(1.0, ours[k].abs().max().item()), (name, k, diff)
    with capsys.disabled():
        print(f"\nspeculators Eagle3DraftModel vs ours, float32, 4 TTT steps: largest |logit difference| {worst:.3g}")


@pytest.mark.parametrize("fmt", ["sglang", "speculators"])
def test_training_says_when_the_engine_must_read_the_eagle31_flags(tmp_path, tiny_target_folder, capsys, fmt):
    """A norm_output draft in SGLang's layout is served wrongly by an engine that ignores the flag (it feeds
    the raw hidden state back): training says so, and names the flag; the speculators layout needs no warning."""
    data = write_conversations(tmp_path / "d.jsonl", n=2)
    main(["train", "--target", str(tiny_target_folder), f"data.train_path={data}", *QUICK,
          "target.draft.norm_output=true", f"train.export_format={fmt}", f"out_dir={tmp_path / 'run'}"])
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "draft" / "config.json").read_text())["norm_output"] is True
    assert ("EAGLE 3.1's norm_output (written to its config.json)" in printed) == (fmt == "sglang")
