"""Bad input, each from a real file: an error naming file, line and field, or (data.on_error=skip) a skip
that is counted and reported once. Covers data lines, over-long samples, chat templates, targets and
draft checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from specforge.cli import main
from specforge.config import DataConfig, TargetConfig, load_config
from specforge.data.conversations import Conversation, DataError, bundled_path, read_jsonl
from specforge.data.template import ensure_chat_template, tokenize_all
from specforge.eagle3.checkpoint import load_draft, save_draft
from specforge.prepare import load_conversations
from specforge.targets import load_target, load_target_head

from .conftest import tiny_draft, tiny_target

GOOD = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
BAD_LINES = {
    "malformed JSON": ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
    "unknown role": ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
                     "messages[0].role: unknown role 'wizard'"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "hi"}]}',
                          "field 'messages' has no assistant turn"),
    "prompt-only line": ('{"turns": ["hi"]}', "field 'turns' holds prompts only"),
    "empty assistant text": ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}',
                             "conversations[1].value: assistant text is empty"),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(tmp_path, *overrides):
    return load_config(overrides=[f"out_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_training_line_names_file_line_and_field(tmp_path, kind):
    """The default (on_error=raise) stops at the first bad line, naming where it is and what is wrong."""
    line, field = BAD_LINES[kind]
    data = _write(tmp_path / "train.jsonl", [GOOD, GOOD, line, GOOD])
    with pytest.raises(DataError) as e:
        load_conversations(_cfg(tmp_path, f"data.train_path={data}"), None, None)
    assert str(e.value).startswith(f"{data}:3: ") and field in str(e.value)


def test_bad_eval_line_is_named_too(tmp_path):
    train = _write(tmp_path / "train.jsonl", [GOOD] * 3)
    held = _write(tmp_path / "eval.jsonl", [GOOD, BAD_LINES["no assistant turn"][0]])
    with pytest.raises(DataError, match=f"{held}:2: field 'messages' has no assistant turn"):
        load_conversations(_cfg(tmp_path, f"data.train_path={train}", f"data.eval_path={held}"), None, None)


def test_skip_counts_bad_lines_and_reports_once_per_file(tmp_path, capsys):
    rows = [GOOD] * 40
    for i, kind in zip((2, 10, 20, 30, 35), BAD_LINES):  # lines 3, 11, 21, 31, 36
        rows[i] = BAD_LINES[kind][0]
    data = _write(tmp_path / "train.jsonl", rows)
    train, held = load_conversations(_cfg(tmp_path, f"data.train_path={data}", "data.on_error=skip"), None, None)
    assert len(train) == 35 and held is None
    out = capsys.readouterr().out
    assert out.count("data: skipped") == 1
    assert f"data: skipped 5 of 40 lines of {data} (first: {data}:3: malformed JSON" in out
    # The sources of the kept conversations still point at their own lines.
    assert train[2].meta["source"] == f"{data}:4"


def test_skip_with_nothing_left_and_bad_on_error_value(tmp_path):
    data = _write(tmp_path / "train.jsonl", [BAD_LINES["malformed JSON"][0], BAD_LINES["unknown role"][0]])
    with pytest.raises(DataError, match=f"{data}: every line was bad \\(first: {data}:1: malformed JSON"):
        load_conversations(_cfg(tmp_path, f"data.train_path={data}", "data.on_error=skip"), None, None)
    with pytest.raises(DataError, match="data.on_error='ignore': choose one of raise, skip"):
        load_conversations(_cfg(tmp_path, f"data.train_path={data}", "data.on_error=ignore"), None, None)
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=f"{empty}: no conversations"):
        load_conversations(_cfg(tmp_path, f"data.train_path={empty}"), None, None)


def test_prompt_files_still_read_without_answers(tmp_path):
    """Bench and prepare-data prompts have no assistant turns, and that is legal there."""
    prompts = _write(tmp_path / "p.jsonl", [{"turns": ["a", "b"]}, {"messages": [{"role": "user", "content": "c"}]}])
    assert [c.user_turns() for c in read_jsonl(prompts)] == [["a", "b"], ["c"]]
    assert len(list(read_jsonl(bundled_path("bench_prompts.jsonl")))) > 0
    assert len(list(read_jsonl(bundled_path("train_prompts.jsonl")))) > 0


def _long_and_short(n_long=2, n_short=3):
    long_text = " ".join(["word"] * 80)
    convs = [Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long_text}],
                          id=f"long{i}") for i in range(n_long)]
    convs += [Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                           id=f"short{i}") for i in range(n_short)]
    return convs


def test_too_long_truncate_or_drop_is_counted(smol_tokenizer, capsys):
    convs = _long_and_short()
    kept = tokenize_all(smol_tokenizer, convs, DataConfig(max_length=40))
    assert len(kept) == 5 and max(len(s.input_ids) for s in kept) == 40
    assert "data: 2 of 5 conversations longer than max_length=40 were truncated" in capsys.readouterr().out
    kept = tokenize_all(smol_tokenizer, convs, DataConfig(max_length=40, too_long="drop"))
    assert [s.id for s in kept] == ["short0", "short1", "short2"]
    assert "data: 2 of 5 conversations longer than max_length=40 were dropped" in capsys.readouterr().out
    with pytest.raises(DataError, match="none of the 2 conversations is usable"):
        tokenize_all(smol_tokenizer, convs[:2], DataConfig(max_length=40, too_long="drop"))
    with pytest.raises(DataError, match="data.too_long='cut'"):
        tokenize_all(smol_tokenizer, convs, DataConfig(too_long="cut"))


def test_tokenisation_errors_raise_or_skip(smol_tokenizer, capsys):
    """A conversation built in code (not read from a file) with an empty answer reaches the tokeniser."""
    convs = _long_and_short(0, 2)
    convs.insert(1, Conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
                                 id="e", meta={"source": "mine.jsonl:7"}))
    with pytest.raises(DataError, match="mine.jsonl:7: message 1 \\(assistant\\) has empty content"):
        tokenize_all(smol_tokenizer, convs, DataConfig())
    kept = tokenize_all(smol_tokenizer, convs, DataConfig(on_error="skip"))
    assert [s.id for s in kept] == ["short0", "short1"]
    assert ("data: skipped 1 of 3 conversations that could not be tokenised (first: mine.jsonl:7: message 1 "
            "(assistant) has empty content)") in capsys.readouterr().out


def test_online_setup_reports_dropped_samples(tmp_path, tiny_target_folder, capsys):
    """build-vocab runs the training data path (online_setup) end to end on the tiny target."""
    long_row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 80}]}
    data = _write(tmp_path / "d.jsonl", [GOOD, long_row, GOOD, GOOD, GOOD, long_row])
    main(["build-vocab", "--target", str(tiny_target_folder), f"out_dir={tmp_path / 'run'}",
          f"data.train_path={data}", "data.eval_every=3", "data.max_length=40", "data.too_long=drop",
          "target.draft.draft_vocab_size=64"])
    out = capsys.readouterr().out
    # Dropped before the held-out split (as dump-hidden does): one count over all 6.
    assert "data: 2 of 6 conversations longer than max_length=40 were dropped" in out


@pytest.fixture
def no_template_folder(tmp_path, tiny_target_folder):
    """The tiny target with its chat template removed, as some base-model tokenizers ship."""
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_target_folder, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return folder


def test_tokenizer_without_chat_template(tmp_path, no_template_folder, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(no_template_folder)
    with pytest.raises(DataError) as e:
        ensure_chat_template(tok)
    assert f"tokenizer '{no_template_folder}' has no chat template" in str(e.value)
    assert "--chat-template FILE" in str(e.value) and "data.chat_template=FILE" in str(e.value)
    missing = tmp_path / "nope.jinja"
    with pytest.raises(DataError, match=f"data.chat_template={missing}: no such file"):
        ensure_chat_template(tok, str(missing))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(DataError, match=f"chat template {broken}: cannot render"):
        ensure_chat_template(tok, str(broken))
    # Through the CLI: the same error, then the flag fixes it.
    data = _write(tmp_path / "d.jsonl", [GOOD] * 4)
    args = ["build-vocab", "--target", str(no_template_folder), f"out_dir={tmp_path / 'run'}",
            f"data.train_path={data}", "target.draft.draft_vocab_size=64"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert str(e.value).startswith("error: tokenizer") and "--chat-template FILE" in str(e.value)
    with pytest.raises(SystemExit, match=f"error: data.chat_template={missing}: no such file"):
        main(args + ["--chat-template", str(missing)])
    good = tmp_path / "chatml.jinja"
    good.write_text(CHATML)
    main(args + ["--chat-template", str(good)])
    assert (tmp_path / "run" / "vocab.safetensors").is_file()


def test_bad_target_folders_are_named(tmp_path, tiny_target_folder):
    cpu = torch.device("cpu")
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit, match=f"target x: {missing} does not exist"):
        load_target(TargetConfig(name="x", path=str(missing)), cpu)
    with pytest.raises(SystemExit, match=f"--target '{missing}': neither a preset"):
        load_config(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"target x: {empty} has no config.json"):
        load_target(TargetConfig(name="x", path=str(empty)), cpu)
    cases = {
        "not-json": ('{"architectures": ["LlamaForCausalLM"],', "not valid JSON (Expecting"),
        "encoder": (json.dumps({"architectures": ["BertModel"], "model_type": "bert"}),
                    "architectures ['BertModel'] is not a causal LM"),
        "no-arch": (json.dumps({"model_type": "llama"}), "no 'architectures' field"),
        "odd-type": (json.dumps({"architectures": ["FooForCausalLM"], "model_type": "no-such-type"}),
                     "transformers cannot read it"),
    }
    for name, (text, expected) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(text)
        for load in (load_target, load_target_head):
            with pytest.raises(SystemExit) as e:
                load(TargetConfig(name=name, path=str(folder)), cpu)
            assert f"target {folder / 'config.json'}: " in str(e.value) and expected in str(e.value), name
    # A valid config but no weights.
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(tiny_target_folder / "config.json", folder / "config.json")
    with pytest.raises(SystemExit, match=f"target {folder}: cannot load the model"):
        load_target(TargetConfig(name="w", path=str(folder)), cpu)


@pytest.fixture(scope="module")
def saved_draft(tmp_path_factory):
    target = tiny_target()
    folder = save_draft(tiny_draft(target), tmp_path_factory.mktemp("draft") / "d", torch.float32)
    return target, folder


def _edited(src, dst, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors:
        t = load_file(str(dst / "model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "model.safetensors"))
    return dst


def test_draft_for_another_target_is_refused(tmp_path, saved_draft):
    target, folder = saved_draft
    embed = target.model.embed_tokens
    assert load_draft(folder, embed, num_target_layers=8) is not None  # the unedited draft loads
    with pytest.raises(SystemExit, match=f"{folder}: vocab_size=256 in config.json, but the target's vocabulary "
                                         "has 300 tokens"):
        load_draft(folder, nn.Embedding(300, 64))
    with pytest.raises(SystemExit, match=f"{folder}: hidden_size=64 in config.json, but the target's hidden size "
                                         "is 32"):
        load_draft(folder, nn.Embedding(256, 32))
    # Layers 1, 3, 6 in SGLang's convention (outputs) are the inputs of 2, 4, 7: past a 4-layer target's depth.
    deep = _edited(folder, tmp_path / "deep",
                   config=lambda c: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[1, 3, 6]))
    assert load_draft(deep, embed, num_target_layers=8).config.eagle_aux_hidden_state_layer_ids == [2, 4, 7]
    with pytest.raises(SystemExit, match=f"{deep}: eagle_config.eagle_aux_hidden_state_layer_ids=\\[1, 3, 6\\] in "
                                         "config.json \\(the outputs of those layers\\), but the target has 4 layers"):
        load_draft(deep, embed, num_target_layers=4)

    two = _edited(folder, tmp_path / "two-aux",
                  tensors=lambda t: t.update({"fc.weight": t["fc.weight"][:, :128].contiguous()}))
    with pytest.raises(SystemExit, match=f"{two}: fc.weight has input width 128 = 2 x hidden_size=64; an EAGLE-3 "
                                         "draft reads 3 aux layers"):
        load_draft(two, embed)
    ids2 = _edited(folder, tmp_path / "ids2",
                   config=lambda c: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[2, 4]))
    with pytest.raises(SystemExit, match=f"{ids2 / 'config.json'}: eagle_config.eagle_aux_hidden_state_layer_ids="
                                         "\\[2, 4\\] in config.json; EAGLE-3 reads 3 layers"):
        load_draft(ids2, embed)
    no_hidden = _edited(folder, tmp_path / "no-hidden", config=lambda c: c.pop("hidden_size"))
    with pytest.raises(SystemExit, match=f"{no_hidden / 'config.json'}: field 'hidden_size' is missing"):
        load_draft(no_hidden, embed)
    dv = _edited(folder, tmp_path / "dv", config=lambda c: c.update(draft_vocab_size=32))
    with pytest.raises(SystemExit, match=f"{dv}: tensor shapes do not match config.json \\(size mismatch for"):
        load_draft(dv, embed)
    broken = _edited(folder, tmp_path / "broken")
    (broken / "config.json").write_text("{")
    with pytest.raises(SystemExit, match=f"{broken / 'config.json'}: not valid JSON"):
        load_draft(broken, embed)


def test_bench_refuses_a_draft_of_another_target(tmp_path, saved_draft, tiny_target_folder):
    """bench loads the tiny target (SmolLM2 vocabulary) and a draft made for a 256-token vocabulary."""
    _, folder = saved_draft
    with pytest.raises(SystemExit, match=f"{folder}: vocab_size=256 in config.json, but the target's vocabulary "
                                         "has 49152 tokens"):
        main(["bench", "--target", str(tiny_target_folder), f"out_dir={tmp_path}", "--draft", str(folder),
              "bench.limit=1"])


def test_dump_hidden_uses_the_same_tokenisation(tmp_path, tiny_target_folder, capsys):
    """dump-hidden drops (and counts) what training would drop, so its samples match online training's."""
    from specforge.dump import dump_hidden

    long_row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 80}]}
    data = _write(tmp_path / "d.jsonl", [GOOD, long_row, GOOD])
    cfg = load_config(str(tiny_target_folder), overrides=[
        f"out_dir={tmp_path / 'run'}", f"data.train_path={data}", "data.max_length=40", "data.too_long=drop",
        f"dump.out={tmp_path / 'dump'}"])
    dump_hidden(cfg)
    assert "data: 1 of 3 conversations longer than max_length=40 were dropped" in capsys.readouterr().out
    from specforge.data.shards import load_manifest

    assert load_manifest(tmp_path / "dump").identity.num_samples == 2
