"""Inter-process locks, so concurrent runs on one repo or store queue instead of colliding."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: str | Path, on_wait=None) -> Iterator[float]:
    """Hold an exclusive advisory lock on ``path``; yields the seconds spent waiting.

    Blocks until the lock is free. ``on_wait`` is called once if we have to wait.
    The lock dies with the process, so a crashed holder never blocks others.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    t0 = time.monotonic()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.monotonic() - t0
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
