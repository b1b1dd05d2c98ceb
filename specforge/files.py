"""Files written whole or not at all: each goes to a temporary name beside its own and is renamed over it once
complete, so a killed run leaves the old file or the new one, never half of one (the rename is atomic within
a file system)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_file(path: str | Path) -> None:
    """Push a written file to the disk (before a rename makes it visible)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def replacing(path: str | Path, sync: bool = False) -> Iterator[Path]:
    """Yields the temporary path to write; when the block ends without an error it becomes `path` (first
    pushed to the disk with `sync`, for files a later step relies on after a crash of the machine); when it
    raises, the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        if sync:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, sync: bool = False) -> None:
    with replacing(path, sync) as tmp:
        tmp.write_text(text, encoding="utf-8")
