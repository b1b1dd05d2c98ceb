"""Real datasets through `datasets`: every accepted source and layout tokenises into the ids and loss masks of
the JSONL path (and of plain per-conversation tokenisation); the tokenised map is cached and a rerun reads
it; a missing dataset, a dataset without usable fields and a download that is not allowed end with a clear
message."""

import copy
import json
import os
import shutil
import socket

import datasets
import huggingface_hub.constants
import pytest
import torch
from datasets import Dataset, DatasetDict
from datasets.packaged_modules.parquet.parquet import Parquet

from specforge.config import DataConfig, load_config
from specforge.data import tables, template
from specforge.data.conversations import Conversation, DataError
from specforge.data.tables import open_table, read_prompts
from specforge.data.template import tokenize_conversation, tokenize_table
from specforge.prepare import load_samples

# User and assistant alternating, multi-turn, one long enough to be cut at MAX.
CONVS = [
    [("user", "Name a colour."), ("assistant", "Blue.")],
    [("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?"), ("assistant", "6, since 3+3=6.")],
    [("user", "Write a haiku about rain."), ("assistant", "Soft rain on the roof,\nthe gutters hum a low tune,\n"
                                                        "puddles hold the sky.")],
    [("user", "Explain recursion briefly."), ("assistant", "A function that calls itself " * 12)],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Say bye."), ("assistant", "Bye!")],
    [("user", "List three fruits."), ("assistant", "Apple, pear, plum.")],
]
MAX = 64


def openai(c):
    return {"messages": [{"role": r, "content": t} for r, t in c]}


def sharegpt(c):
    return {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": t} for r, t in c]}


def ultrachat(c, i):
    return {"prompt": c[0][1], "prompt_id": f"p{i}", "messages": openai(c)["messages"]}


def old_ultrachat(c, i):
    return {"id": str(i), "data": [t for _, t in c]}


def _rows(fn):
    return [fn(c, i) if fn in (ultrachat, old_ultrachat) else fn(c) for i, c in enumerate(CONVS)]


def _dataset(fn):
    rows = _rows(fn)
    return Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(tmp_path, **kw):
    return DataConfig(**{"max_length": MAX, "cache_dir": str(tmp_path / "cache"), **kw})


@pytest.fixture(scope="module")
def reference(smol_tokenizer):
    """Plain per-conversation tokenisation, no map and no cache."""
    convs = [Conversation([{"role": r, "content": t} for r, t in c]) for c in CONVS]
    return [tokenize_conversation(smol_tokenizer, c, MAX) for c in convs]


def _same(samples, reference):
    assert len(samples) == len(reference)
    for s, r in zip(samples, reference):
        assert s.input_ids.dtype == torch.long and s.loss_mask.dtype == torch.bool
        assert torch.equal(s.input_ids, r.input_ids) and torch.equal(s.loss_mask, r.loss_mask)


@pytest.fixture
def hf_caches(tmp_path, monkeypatch):
    """Empty HF datasets and hub caches of this test's own."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    return tmp_path / "hf-datasets", tmp_path / "hf-hub"


def _sources(tmp_path, hf_caches):
    """(spec, need) for each accepted source, the same six conversations in each."""
    out = []
    jsonl = _jsonl(tmp_path / "openai.jsonl", _rows(openai))
    out.append(str(jsonl))  # the JSONL path, read line by line
    _dataset(openai).to_parquet(str(tmp_path / "openai.parquet"))
    out.append(str(tmp_path / "openai.parquet"))
    sg = _dataset(sharegpt)
    sg.select(range(3)).to_parquet(str(tmp_path / "sg" / "part-0.parquet"))
    sg.select(range(3, 6)).to_parquet(str(tmp_path / "sg" / "part-1.parquet"))
    out.append(str(tmp_path / "sg" / "part-*.parquet"))  # a glob of parquet files
    DatasetDict({"train_sft": _dataset(ultrachat), "test_sft": _dataset(ultrachat).select([0])}).save_to_disk(
        str(tmp_path / "saved"))
    out.append(f"{tmp_path / 'saved'}:train_sft")  # save_to_disk, a split named
    _dataset(old_ultrachat).save_to_disk(str(tmp_path / "saved-old"))
    out.append(str(tmp_path / "saved-old"))
    (tmp_path / "jsonl-folder").mkdir()
    _jsonl(tmp_path / "jsonl-folder" / "train.jsonl", _rows(sharegpt))  # jsonl through datasets' json reader
    out.append(str(tmp_path / "jsonl-folder"))
    # Arrow files as `datasets` writes them after a hub download: HF_DATASETS_CACHE/org___name/config/version/hash.
    _dataset(ultrachat).to_parquet(str(tmp_path / "uc-train.parquet"))
    _dataset(ultrachat).select([0]).to_parquet(str(tmp_path / "uc-test.parquet"))
    builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name="ultrachat_200k", hash="0123abcd",
                      data_files={"train_sft": [str(tmp_path / "uc-train.parquet")],
                                  "test_sft": [str(tmp_path / "uc-test.parquet")]})
    builder.download_and_prepare()
    dest = hf_caches[0] / "HuggingFaceH4___ultrachat_200k" / "default" / "0.0.0" / "0123abcd"
    dest.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, dest)
    out.append("HuggingFaceH4/ultrachat_200k:train_sft")
    # A hub snapshot (huggingface-cli download --repo-type dataset), never prepared by `datasets`.
    commit = "a" * 40
    repo = hf_caches[1] / "datasets--someone--chats"
    _dataset(openai).to_parquet(str(repo / "snapshots" / commit / "data" / "train-00000-of-00001.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out.append("someone/chats")
    return out


def test_every_source_and_layout_gives_the_jsonl_tokens(tmp_path, hf_caches, smol_tokenizer, reference,
                                                        monkeypatch):
    """Nothing is fetched while doing it: any outgoing connection would fail the test."""

    def no_network(*a, **k):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    data = _data(tmp_path)
    for spec in _sources(tmp_path, hf_caches):
        table = open_table(spec, data, need_answer=True, label="data.train_path")
        assert [c.messages for c in table.conversations()] == [
            [{"role": r, "content": t} for r, t in c] for c in CONVS], spec
        _same(tokenize_table(smol_tokenizer, table, data), reference)


def test_rerun_reads_the_cache(tmp_path, smol_tokenizer, reference, monkeypatch, capsys):
    """The second run tokenises nothing (the tokeniser would fail if called) and leaves the cache files as
    they were; the rows of a parquet file are read back from their cache the same way."""
    _dataset(sharegpt).to_parquet(str(tmp_path / "d.parquet"))
    jsonl = _jsonl(tmp_path / "d.jsonl", _rows(openai))
    data = _data(tmp_path, num_proc=1)
    for spec in (str(jsonl), str(tmp_path / "d.parquet")):
        _same(tokenize_table(smol_tokenizer, open_table(spec, data, True, "data.train_path"), data), reference)
    files = sorted((tmp_path / "cache").rglob("*.arrow"))
    assert sum(f.parent.parent.name == "tokens" for f in files) == 2  # one tokenised file per source
    assert sum(f.parent.parent.name == "rows" for f in files) == 1  # the parquet rows
    stamps = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    assert "cached in" in capsys.readouterr().out

    def never(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(template, "_ids_and_mask", never)
    monkeypatch.setattr(tables, "parse_line", never)  # the dataset rows' parser
    monkeypatch.setattr(tables, "read_jsonl", never)  # the JSONL reader: its table is cached too
    for spec in (str(jsonl), str(tmp_path / "d.parquet")):
        _same(tokenize_table(smol_tokenizer, open_table(spec, data, True, "x"), data), reference)
    assert capsys.readouterr().out.count("read from") == 2
    assert sorted((tmp_path / "cache").rglob("*.arrow")) == files
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == stamps
    # Another max_length is another key, and so is another chat template.
    monkeypatch.undo()
    table = open_table(str(jsonl), data, True, "x")
    tokenize_table(smol_tokenizer, table, _data(tmp_path, num_proc=1, max_length=32))
    other = copy.deepcopy(smol_tokenizer)
    other.chat_template = other.chat_template.replace("<|im_start|>system", "<|im_start|>system ")
    tokenize_table(other, table, data)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 4


def test_cached_jsonl_table_repeats_its_skips_and_errors(tmp_path, monkeypatch, capsys):
    """A JSONL file read with on_error=skip reports its skipped lines again when read from the cache, and
    a run with on_error=raise still stops at the first bad line."""
    rows = [json.dumps(r) for r in _rows(openai)]
    rows[1] = '{"messages": [{"role": "user", "content": "hi"}'
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    skip = _data(tmp_path, on_error="skip")
    first = open_table(str(path), skip, True, "data.train_path")
    report = f"data: skipped 1 of 6 lines of {path} (first: {path}:2: malformed JSON"
    assert report in capsys.readouterr().out
    monkeypatch.setattr(tables, "read_jsonl", lambda *a, **k: pytest.fail("read again"))
    again = open_table(str(path), skip, True, "data.train_path")
    assert report in capsys.readouterr().out
    assert again.fingerprint == first.fingerprint
    assert [c.meta["source"] for c in again.conversations()] == [f"{path}:{i}" for i in (1, 3, 4, 5, 6)]
    with pytest.raises(DataError, match=f"^{path}:2: malformed JSON"):
        open_table(str(path), _data(tmp_path), True, "data.train_path")
    # Another file content is another key.
    path.write_text("\n".join(rows[:1]) + "\n")
    monkeypatch.undo()
    assert len(open_table(str(path), skip, True, "data.train_path")) == 1


def test_pool_gives_the_same_samples(tmp_path, smol_tokenizer, reference):
    """data.num_proc=2 runs the map in two processes; the result is the single-process one."""
    data = _data(tmp_path, num_proc=2)
    table = open_table(str(_jsonl(tmp_path / "d.jsonl", _rows(openai))), data, True, "data.train_path")
    _same(tokenize_table(smol_tokenizer, table, data), reference)
    assert len(list((tmp_path / "cache" / "tokens").rglob("tokens_*_of_00002.arrow"))) == 2


def test_load_samples_same_split_from_jsonl_and_parquet(tmp_path, smol_tokenizer):
    """Training reads a parquet file into the same training and held-out samples as the JSONL file, with
    the same truncation count."""
    _dataset(openai).to_parquet(str(tmp_path / "d.parquet"))
    jsonl = _jsonl(tmp_path / "d.jsonl", _rows(openai))
    got = []
    for spec in (jsonl, tmp_path / "d.parquet"):
        cfg = load_config(overrides=[f"out_dir={tmp_path / 'run'}", f"data.train_path={spec}", "data.eval_every=3",
                                     f"data.max_length={MAX}", f"data.cache_dir={tmp_path / 'cache'}"])
        got.append(load_samples(cfg, None, smol_tokenizer))
    (a_train, a_held), (b_train, b_held) = got
    assert len(a_train) == 4 and len(a_held) == 2
    for x, y in zip(a_train + a_held, b_train + b_held):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)


def test_missing_dataset_and_download_not_allowed(tmp_path, hf_caches, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    data = _data(tmp_path)
    with pytest.raises(DataError) as e:
        open_table("nobody/nothing:train", data, True, "data.train_path")
    msg = str(e.value)
    assert msg.startswith("data.train_path=nobody/nothing:train: no such file or folder, and no dataset "
                          "'nobody/nothing' in the local HF cache")
    assert str(hf_caches[0]) in msg and str(hf_caches[1]) in msg
    assert "data.allow_download=false, so nothing is downloaded" in msg
    with pytest.raises(DataError, match="data.eval_path=https://example.com/d.parquet: a remote file, and "
                                        "data.allow_download=false"):
        open_table("https://example.com/d.parquet", data, True, "data.eval_path")
    with pytest.raises(DataError, match=f"data.train_path={tmp_path}/nope.parquet: no such file or folder$"):
        open_table(f"{tmp_path}/nope.parquet", data, True, "data.train_path")
    with pytest.raises(DataError, match="no file matches"):
        open_table(f"{tmp_path}/*.parquet", data, True, "data.train_path")
    # The hub libraries are back online afterwards (the offline switch is scoped to the read).
    assert datasets.config.HF_HUB_OFFLINE == huggingface_hub.constants.HF_HUB_OFFLINE == bool(
        os.environ.get("HF_HUB_OFFLINE"))


def test_dataset_without_usable_fields_names_its_columns(tmp_path):
    Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError) as e:
        open_table(str(tmp_path / "d.parquet"), _data(tmp_path), True, "data.train_path")
    assert str(e.value).startswith(f"data.train_path={tmp_path}/d.parquet: no usable field; the dataset has "
                                   "columns text, label, and conversations come from messages (OpenAI, UltraChat)")


def test_several_splits_must_be_named(tmp_path):
    DatasetDict({"train_sft": _dataset(openai), "test_sft": _dataset(openai)}).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(DataError, match="several splits \\(train_sft, test_sft\\): name one as SOURCE:train_sft"):
        open_table(str(tmp_path / "s"), _data(tmp_path), True, "data.train_path")
    with pytest.raises(DataError, match="no split 'dev' \\(splits: train_sft, test_sft\\)"):
        open_table(f"{tmp_path / 's'}:dev", _data(tmp_path), True, "data.train_path")


def test_bad_rows_name_source_row_and_field(tmp_path, capsys):
    """The JSONL checks, on dataset rows: raise names the row, skip counts and reports once."""
    rows = _rows(openai)
    rows[2] = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    rows[4] = {"messages": [{"role": "user", "content": "hi"}]}
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    spec = str(tmp_path / "d.parquet")
    with pytest.raises(DataError) as e:
        open_table(spec, _data(tmp_path), True, "data.train_path")
    assert str(e.value) == f"{spec} row 2: messages[0].role: unknown role 'wizard'"
    table = open_table(spec, _data(tmp_path, on_error="skip"), True, "data.train_path")
    assert len(table) == 4 and table.conversations()[2].meta["source"] == f"{spec} row 3"
    out = capsys.readouterr().out
    assert out.count("data: skipped") == 1
    assert f"data: skipped 2 of 6 rows of data.train_path={spec} (first: {spec} row 2: messages[0].role" in out


def test_prompt_layouts(tmp_path):
    """prepare.prompts: prompt-only rows (`prompt`, `turns`, Alpaca `instruction`), and conversations whose
    user turns are the prompts; training refuses prompt-only rows with the usual hint."""
    Dataset.from_dict({"prompt": ["Name a colour.", "Count to 3."]}).to_parquet(str(tmp_path / "p.parquet"))
    Dataset.from_dict({"turns": [["a", "b"], ["c"]]}).save_to_disk(str(tmp_path / "t"))
    _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Sum these.", "input": "2 3", "output": ""},
                                       {"instruction": "Say hi.", "output": "Hi!"}])
    data = _data(tmp_path)
    assert [c.user_turns() for c in read_prompts(str(tmp_path / "p.parquet"), data)] == [["Name a colour."],
                                                                                         ["Count to 3."]]
    assert [c.user_turns() for c in read_prompts(str(tmp_path / "t"), data)] == [["a", "b"], ["c"]]
    alpaca = read_prompts(str(tmp_path / "alpaca.jsonl"), data)
    assert [c.messages for c in alpaca] == [[{"role": "user", "content": "Sum these.\n\n2 3"}],
                                            [{"role": "user", "content": "Say hi."},
                                             {"role": "assistant", "content": "Hi!"}]]
    with pytest.raises(DataError, match="row 0: field 'prompt' holds a prompt only, no assistant turn "
                                        "\\(answer prompts with `specforge prepare-data`\\)"):
        open_table(str(tmp_path / "p.parquet"), data, True, "data.train_path")
