"""Messages of a run, printed once: every process of a launched run reads the same data with the same code,
and only the first (RANK 0, or a process started without a launcher) speaks for them."""

from __future__ import annotations

import os


def say(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)
