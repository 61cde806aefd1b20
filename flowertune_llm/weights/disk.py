"""Disk space, checked before anything is written: a round whose output cannot fit is not started."""

from __future__ import annotations

import shutil
from pathlib import Path

from flowertune_llm.units import human_bytes


class InsufficientDiskSpaceError(OSError):
    """The output would not fit: raised before anything is written."""


def check_disk_space(directory: Path | str, needed_bytes: int, *, what: str = "the checkpoint") -> int:
    """Raise :class:`InsufficientDiskSpaceError` unless ``directory``'s filesystem has ``needed_bytes`` free.

    ``directory`` need not exist yet (its nearest existing ancestor is measured). Returns the free bytes.
    """
    directory = Path(directory).expanduser().absolute()
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise InsufficientDiskSpaceError(
            f"not enough disk space for {what} in {directory}: it needs {human_bytes(needed_bytes)} "
            f"({needed_bytes:,} bytes) but only {human_bytes(free)} ({free:,} bytes) are free"
        )
    return free
