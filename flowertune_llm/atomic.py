"""Files written whole or not at all: a scratch file beside the target, fsynced, then renamed over it.

Run files (``history.json``, ``loss.png``), a node's round state and the federation's certificates and keys
all go through here, so a process killed mid-write never leaves a half-written file. Whole checkpoint
directories use the same idea at directory scale (weights/shards.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a scratch file beside ``target``; fsync it and rename it over ``target`` only if the block succeeds.

    The scratch file is created owner-only (mkstemp), so a private key is never readable by others, and gets
    ``mode`` just before the rename.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    scratch = Path(name)
    try:
        yield scratch
        with scratch.open("rb+") as handle:
            os.fsync(handle.fileno())
        scratch.chmod(mode)
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> Path:
    with atomic_path(path, mode) as scratch:
        scratch.write_bytes(data)
    return Path(path)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())
