"""Conversations from any source as one arrow table, the form tokenisation reads.

Sources (data.train_path, data.eval_path, prepare.prompts), `SOURCE:SPLIT` picking a split:
- a JSONL file: read line by line (conversations.read_jsonl), errors name the file and the line;
- parquet, arrow or jsonl files through `datasets`: a file, a folder (splits inferred from the file names,
  as `datasets` does), or a glob;
- a folder written by `save_to_disk`;
- a dataset name found in the local HF cache (prepared by `datasets`, or a hub snapshot), fetched from the
  hub only with data.allow_download=true: the hub libraries run in offline mode otherwise.
Rows become the columns messages (role/content), id, category and source through the record parser of the
JSONL lines (conversations.parse_line: same layouts, role aliases and checks), in a `datasets.map` cached
under data.cache_dir and keyed by the source's content hash or its own fingerprint. Errors name the source,
the row and the field; data.on_error=skip leaves bad rows out and reports them once."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import DataConfig, cache_dir
from ..log import say
from .conversations import FIELDS, ON_ERROR, Conversation, DataError, parse_line, read_jsonl, skipped_lines

ROWS_FORMAT = 1  # bump when the row mapping writes something else for the same rows
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SPLIT = re.compile(r"^[\w.-]+$")
LAYOUTS = ("messages (OpenAI, UltraChat), conversations (ShareGPT), data (older UltraChat), instruction "
           "(Alpaca), turns or prompt (prompts only)")


@dataclass
class Table:
    """Conversations as an arrow table (columns messages, id, category, source) with a fingerprint of what
    tokenisation reads from it (the messages)."""

    ds: object  # datasets.Dataset
    fingerprint: str
    label: str

    def __len__(self) -> int:
        return len(self.ds)

    def conversations(self) -> list[Conversation]:
        return [Conversation(r["messages"], id=r["id"], category=r["category"], meta={"source": r["source"]})
                for r in self.ds]


def digest(*parts) -> str:
    """A cache key of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def data_cache(data: DataConfig) -> Path:
    return Path(data.cache_dir) if data.cache_dir else cache_dir() / "data"


def num_proc(data: DataConfig, rows: int) -> Optional[int]:
    """Processes for a map over `rows` rows: data.num_proc, else one per available core (at most 16) and at
    least 500 rows each. None (this process) for one: a pool costs more than it saves on small data."""
    if data.num_proc is not None:
        n = data.num_proc
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = min(cores, 16, rows // 500)
    n = min(n, rows)
    return n if n > 1 else None


@contextmanager
def quiet(rows: int):
    """No progress bars for small maps (the quickstart's few hundred conversations): they would only add
    lines to the run's output."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if rows >= 10_000 or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def row_features(with_error: bool = False):
    from datasets import Features, List, Value

    cols = {"messages": List({"role": Value("string"), "content": Value("string")}), "id": Value("string"),
            "category": Value("string"), "source": Value("string")}
    if with_error:
        cols["error"] = Value("string")
    return Features(cols)


def from_conversations(convs: list[Conversation], label: str = "conversations") -> Table:
    """Conversations in memory (read from JSONL, or built in code) as a Table; the fingerprint hashes their
    messages."""
    from datasets import Dataset

    h = hashlib.sha256()
    cols = {"messages": [], "id": [], "category": [], "source": []}
    for c in convs:
        messages = [{"role": m["role"], "content": m["content"]} for m in c.messages]
        h.update(json.dumps(messages, ensure_ascii=False).encode("utf-8") + b"\n")
        cols["messages"].append(messages)
        cols["id"].append(c.id)
        cols["category"].append(c.category)
        cols["source"].append(str(c.meta.get("source", c.id)))
    return Table(Dataset.from_dict(cols, features=row_features()), digest("conversations", h.hexdigest()), label)


def open_table(spec: str, data: DataConfig, need_answer: bool, label: str) -> Table:
    """The conversations of a source. `label` is the config key that named it (data.train_path, ...), for
    the messages; need_answer as in conversations.parse_line."""
    if data.on_error not in ON_ERROR:
        raise DataError(f"data.on_error={data.on_error!r}: choose one of {', '.join(ON_ERROR)}")
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix not in (".parquet", ".arrow"):
        return _jsonl(path, data, need_answer)
    with hub_access(data.allow_download):
        ds, source_fp, where = _load(spec, data, f"{label}={spec}")
    return _rows(ds, source_fp, where, data, need_answer, f"{label}={spec}")


def _jsonl(path: Path, data: DataConfig, need_answer: bool) -> Table:
    """A JSONL file read line by line; the table it gives is kept under a key of the file's bytes, so that
    a rerun reads it back (with the same skip report, or the same error under on_error=raise)."""
    from datasets import load_from_disk

    key = digest("jsonl", ROWS_FORMAT, _hash_files([path], None), str(path), need_answer)
    folder = data_cache(data) / "rows" / key
    if (folder / "report.json").is_file():
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        if report["kept"] < report["lines"]:
            if data.on_error == "raise":
                raise DataError(report["first"])
            say(skipped_lines(path, report["lines"], report["kept"], report["first"]))
        return Table(load_from_disk(str(folder / "table")), report["fingerprint"], str(path))
    report: dict = {}
    table = from_conversations(list(read_jsonl(path, data.on_error, need_answer, report)), str(path))
    if not len(table):  # an empty file: nothing to keep (and arrow cannot write a table of no rows here)
        return table
    tmp = folder.with_name(f"{key}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    table.ds.save_to_disk(str(tmp / "table"))
    (tmp / "report.json").write_text(json.dumps({**report, "fingerprint": table.fingerprint}), encoding="utf-8")
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    # Backed by the cache's files from here on: a pool's workers open them instead of receiving a copy.
    return Table(load_from_disk(str(folder / "table")), table.fingerprint, str(path))


def read_prompts(spec: str, data: DataConfig, label: str = "prepare.prompts") -> list[Conversation]:
    """Prompts to answer (prepare-data): any source, answers not needed (those present are replaced)."""
    return open_table(spec, data, need_answer=False, label=label).conversations()


@contextmanager
def hub_access(allow: bool):
    """Offline mode for `datasets` and `huggingface_hub` unless downloads are allowed."""
    if allow:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _split_spec(spec: str) -> tuple[str, Optional[str]]:
    """SOURCE or SOURCE:SPLIT (a path that exists as written is never split)."""
    if Path(spec).expanduser().exists() or "://" in spec or ":" not in spec:
        return spec, None
    base, split = spec.rsplit(":", 1)
    return (base, split) if SPLIT.match(split) else (spec, None)


def _load(spec: str, data: DataConfig, name: str):
    """(dataset of raw rows, fingerprint of the source, the prefix of row locations)."""
    base, split = _split_spec(spec)
    path = Path(base).expanduser()
    if "://" in base:
        if not data.allow_download:
            raise DataError(f"{name}: a remote file, and data.allow_download=false (set data.allow_download=true "
                            "to fetch it, or copy it here)")
        ds = _pick(_read_files([base], data, name), split, name)
        return ds, ds._fingerprint, spec
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _saved(path, split, name), None, spec
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        ds = _pick(_load_dataset(str(path), data, name), split, name)
        return ds, digest("folder", _hash_files(files, path), ds.split and str(ds.split)), spec
    if path.is_file():
        files = [path]
    elif glob.has_magic(base):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(base), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{name}: no file matches {base}")
    elif HUB_NAME.match(base) and path.suffix not in BUILDERS:
        ds, fp = _named(base, split, data, name)
        return ds, fp, spec
    else:
        raise DataError(f"{name}: no such file or folder")
    ds = _pick(_read_files([str(f) for f in files], data, name), split, name)
    return ds, digest("files", _hash_files(files, None)), spec


def _read_files(files: list[str], data: DataConfig, name: str):
    kinds = {BUILDERS.get(Path(f.split("?")[0]).suffix) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise DataError(f"{name}: files of one kind wanted ({', '.join(sorted(BUILDERS))}), found "
                        f"{', '.join(sorted({Path(f).suffix or Path(f).name for f in files}))}")
    return _load_dataset(kinds.pop(), data, name, data_files={"train": files})


def _load_dataset(path: str, data: DataConfig, name: str, **kw):
    """datasets.load_dataset on local files, its arrow copy kept under the data cache."""
    import datasets

    try:
        return datasets.load_dataset(path, cache_dir=str(data_cache(data) / "hf"), **kw)
    except DataError:
        raise
    except Exception as e:  # pyarrow and datasets raise many kinds; all mean "could not read it"
        raise DataError(f"{name}: datasets could not read it ({type(e).__name__}: {_first_line(e)})") from None


def _saved(path: Path, split: Optional[str], name: str):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{name}: cannot read the saved dataset ({type(e).__name__}: {_first_line(e)})") from None
    return _pick(ds, split, name)


def _named(repo: str, split: Optional[str], data: DataConfig, name: str):
    """A dataset name: the copy `datasets` prepared in its cache, else a snapshot in the hub cache, else (with
    data.allow_download) the hub. (dataset, fingerprint)."""
    import datasets
    import huggingface_hub
    import huggingface_hub.constants as hub

    reasons = []
    with hub_access(False):
        try:
            ds = _pick(datasets.load_dataset(repo), split, name)
            return ds, ds._fingerprint
        except DataError:
            raise
        except Exception as e:
            reasons.append(f"{type(e).__name__}: {_first_line(e)}")
        try:
            folder = huggingface_hub.snapshot_download(repo, repo_type="dataset", local_files_only=True)
        except Exception:
            folder = None
        if folder is not None:
            ds = _pick(_load_dataset(folder, data, name), split, name)
            return ds, digest("hub", repo, Path(folder).name, str(ds.split))
    where = f"looked in the HF datasets cache {datasets.config.HF_DATASETS_CACHE} and the hub cache {hub.HF_HUB_CACHE}"
    if not data.allow_download:
        raise DataError(f"{name}: no such file or folder, and no dataset {repo!r} in the local HF cache ({where}); "
                        "data.allow_download=false, so nothing is downloaded (set data.allow_download=true to "
                        "fetch it from the hub)")
    try:
        ds = _pick(datasets.load_dataset(repo), split, name)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{name}: dataset {repo!r} is not in the local HF cache ({where}) and could not be "
                        f"downloaded ({type(e).__name__}: {_first_line(e)})") from None
    return ds, ds._fingerprint


def _pick(ds, split: Optional[str], name: str):
    """One split of a DatasetDict (the only one, or the one named), or a Dataset checked against `split`."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        if split is not None and split != str(ds.split):
            raise DataError(f"{name}: one dataset (split {ds.split}), no split {split!r}")
        return ds
    splits = list(ds)
    if split is None:
        if len(splits) == 1:
            return ds[splits[0]]
        raise DataError(f"{name}: several splits ({', '.join(splits)}): name one as SOURCE:{splits[0]}")
    if split not in ds:
        raise DataError(f"{name}: no split {split!r} (splits: {', '.join(splits)})")
    return ds[split]


def _hash_files(files: list[Path], root: Optional[Path]) -> list[tuple[str, str]]:
    """(name, sha256 of the bytes) of each file: the content key of local data."""
    out = []
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        out.append((str(f.relative_to(root)) if root else f.name, h.hexdigest()))
    return out


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _rows(ds, source_fp: Optional[str], where: str, data: DataConfig, need_answer: bool, name: str) -> Table:
    """Raw rows as Table rows, through parse_line. The map is cached under a key of the source's content (or
    its own fingerprint), the row locations it writes and need_answer; errors stop or are skipped here."""
    present = [c for c in FIELDS if c in ds.column_names]
    if not present:
        raise DataError(f"{name}: no usable field; the dataset has columns {', '.join(ds.column_names) or '(none)'}"
                        f", and conversations come from {LAYOUTS}")
    source_fp = source_fp or ds._fingerprint
    content = digest("rows", ROWS_FORMAT, source_fp, need_answer)
    key = digest(content, where)
    stem = re.sub(r"[^\w.-]+", "_", Path(where.split(":")[0].rstrip("/*")).name) or "row"
    with quiet(len(ds)):
        out = ds.map(_parse_rows, batched=True, with_indices=True, remove_columns=ds.column_names,
                     fn_kwargs={"where": where, "stem": stem, "need_answer": need_answer},
                     features=row_features(with_error=True), num_proc=num_proc(data, len(ds)),
                     cache_file_name=str(data_cache(data) / "rows" / key / "rows.arrow"), new_fingerprint=key,
                     desc=f"reading {name}")
    errors = out.data.column("error").to_pylist()
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        first = errors[bad[0]]
        if data.on_error == "raise":
            raise DataError(first)
        say(f"data: skipped {len(bad)} of {len(out)} rows of {name} (first: {first})")
        if len(bad) == len(out):
            raise DataError(f"{name}: every row was bad (first: {first})")
        bad_set = set(bad)
        out = out.select([i for i in range(len(out)) if i not in bad_set])
    return Table(out.remove_columns("error"), content, name)


def _parse_rows(batch, indices, where: str, stem: str, need_answer: bool) -> dict:
    out = {"messages": [], "id": [], "category": [], "source": [], "error": []}
    cols = list(batch.keys())
    for j, i in enumerate(indices):
        here = f"{where} row {i}"
        obj = {c: _clean(batch[c][j]) for c in cols if batch[c][j] is not None}
        try:
            conv, error = parse_line(obj, here, need_answer), ""
        except DataError as e:
            conv, error = Conversation([]), str(e)
        out["messages"].append(conv.messages)
        out["id"].append(conv.id or str(obj.get("prompt_id") or f"{stem}-{i}"))
        out["category"].append(conv.category)
        out["source"].append(here)
        out["error"].append(error)
    return out


def _clean(value):
    """A column value without the None fields arrow fills in for keys a record lacks."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
