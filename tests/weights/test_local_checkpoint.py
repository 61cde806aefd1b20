"""Checkpoints served from local disk through mmap: views of the mapped files, row ranges, single files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowertune_llm.weights.groups import plan_groups
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.shards import save_local_checkpoint
from flowertune_llm.weights.tensors import Piece, TensorSpec
from flowertune_llm.weights.transport import from_record, to_record

from conftest import assert_bit_equal, bits, model_state


def _mapped_files(address: int) -> set[str]:
    """Files whose memory mapping in this process contains ``address`` (Linux /proc/self/maps)."""
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        start, stop = (int(x, 16) for x in parts[0].split("-"))
        if start <= address < stop and len(parts) >= 6:
            found.add(parts[5])
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_local_checkpoint_serves_groups_as_views_of_the_mapped_files(tmp_path):
    state = model_state(torch.bfloat16)
    save_local_checkpoint(state, tmp_path / "client", max_shard_bytes=400)
    with LocalCheckpoint(tmp_path / "client") as checkpoint:
        assert set(checkpoint.specs) == set(state) and len(checkpoint.files) > 1
        groups = plan_groups(checkpoint.specs, 300)
        served = {}
        for group in (checkpoint.group(keys) for keys in groups):
            for key, tensor in group.items():
                assert any(f.endswith(".safetensors") for f in _mapped_files(tensor.data_ptr())), key
            served |= from_record(to_record(group))
    for name in state:
        pieces = sorted((Piece.parse(k) for k in served if Piece.parse(k).name == name), key=lambda p: p.rows or (0, 0))
        assert torch.equal(bits(torch.cat([served[p.key] for p in pieces])), bits(state[name]))


def test_local_checkpoint_reads_a_single_file_and_refuses_bad_ranges(tmp_path):
    state = {"w": torch.randn(6, 2).half()}
    save_file(state, tmp_path / "adapter_model.safetensors")
    with LocalCheckpoint(tmp_path / "adapter_model.safetensors") as checkpoint:
        assert torch.equal(checkpoint.tensor("w[2:5]"), state["w"][2:5])
        with pytest.raises(ValueError, match="out of range"):
            checkpoint.tensor("w[4:9]")
        with pytest.raises(KeyError):
            checkpoint.tensor("v")
    with LocalCheckpoint(tmp_path) as checkpoint:  # a directory without an index: its safetensors files
        assert checkpoint.specs == {"w": TensorSpec((6, 2), torch.float16)}


def test_mixed_widths_stay_aligned_and_load(tmp_path):
    state = {
        "odd": torch.randn(3).bfloat16(),
        "f32": torch.randn(5),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(3),
    }
    save_local_checkpoint(state, tmp_path / "ck")
    assert_bit_equal({k: load_file(tmp_path / "ck" / "model.safetensors")[k] for k in state}, state)
    with LocalCheckpoint(tmp_path / "ck") as checkpoint:
        for name in state:
            assert checkpoint.tensor(name).data_ptr() % state[name].element_size() == 0
