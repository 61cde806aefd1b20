"""Files written whole or not at all."""

import os
import stat

import pytest

from flowertune_llm.atomic import atomic_path, write_atomic, write_json


def test_a_write_replaces_the_file_whole_with_the_mode_asked_for(tmp_path):
    target = tmp_path / "keys" / "node.key"  # the directory is made
    write_atomic(target, b"old")
    write_atomic(target, b"secret", mode=0o600)
    assert target.read_bytes() == b"secret" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(target.parent) == ["node.key"]  # no scratch file left


def test_a_failed_write_leaves_the_previous_file_and_no_scratch(tmp_path):
    target = tmp_path / "history.json"
    write_json(target, [{"round": 1}])
    with pytest.raises(RuntimeError), atomic_path(target) as scratch:
        scratch.write_text("[{half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '[\n  {\n    "round": 1\n  }\n]\n'
    assert os.listdir(tmp_path) == ["history.json"]


def test_the_scratch_file_is_private_until_renamed(tmp_path):
    with atomic_path(tmp_path / "ca.key", mode=0o644) as scratch:
        assert stat.S_IMODE(scratch.stat().st_mode) == 0o600  # never readable by others while being written
        scratch.write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o644
