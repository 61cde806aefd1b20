"""Disk space is checked before anything is written, and the error names the place and the bytes."""

from __future__ import annotations

from collections import namedtuple

import pytest

from flowertune_llm.weights import disk as disk_module
from flowertune_llm.weights.disk import InsufficientDiskSpaceError, check_disk_space

Usage = namedtuple("Usage", "total used free")


def test_disk_check_names_the_directory_and_the_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_module.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 1_500_000, 1_500_000))
    target = tmp_path / "runs" / "round-3"  # need not exist yet
    with pytest.raises(InsufficientDiskSpaceError) as error:
        check_disk_space(target, 141_000_000_000)
    message = str(error.value)
    assert str(target) in message
    assert "131.3 GiB (141,000,000,000 bytes)" in message and "1.4 MiB (1,500,000 bytes) are free" in message
    assert check_disk_space(target, 1_000_000) == 1_500_000
