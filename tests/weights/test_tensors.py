"""The vocabulary of weights: specs and their manifests, pieces, dtype names, safetensors file headers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flowertune_llm.weights.tensors import (
    Piece,
    TensorSpec,
    dtype_name,
    entry_spec,
    header_entry,
    read_file_header,
    specs_from_json,
    specs_of,
    specs_to_json,
    torch_dtype,
)

from conftest import model_state


def test_manifest_round_trip():
    specs = specs_of(model_state(torch.bfloat16))
    assert specs_from_json(specs_to_json(specs)) == specs
    assert list(specs_from_json(specs_to_json(specs))) == list(specs)


def test_a_piece_is_a_tensor_or_a_row_range_and_its_key_says_which():
    whole = TensorSpec((10, 4), torch.bfloat16)
    rows = Piece("model.embed_tokens.weight", (2, 5))
    assert rows.key == "model.embed_tokens.weight[2:5]" and Piece.parse(rows.key) == rows
    assert Piece.parse("model.norm.weight") == Piece("model.norm.weight")
    assert rows.spec(whole) == TensorSpec((3, 4), torch.bfloat16) and Piece("w").spec(whole) == whole
    tensor = torch.arange(40, dtype=torch.bfloat16).view(10, 4)
    taken = rows.take(tensor)
    assert taken.data_ptr() == tensor[2].data_ptr() and torch.equal(taken, tensor[2:5])  # a view, not a copy
    for bad in ((5, 5), (8, 11)):
        with pytest.raises(ValueError, match="rows out of range"):
            Piece("w", bad).spec(whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float8_e4m3fn])
def test_dtype_names_round_trip(dtype):
    assert torch_dtype(dtype_name(dtype)) is dtype
    assert TensorSpec((3, 2), dtype).nbytes == 6 * torch.empty(0, dtype=dtype).element_size()


def test_an_unknown_dtype_name_is_refused():
    with pytest.raises(ValueError, match="unsupported dtype 'float7'"):
        torch_dtype("float7")


def test_file_headers_read_as_safetensors_writes_them_and_errors_name_the_file(tmp_path):
    state = {"a": torch.randn(3, 4).bfloat16(), "b": torch.arange(5)}
    save_file(state, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    header, data_start = read_file_header(tmp_path / "ok.safetensors")
    assert set(header) == {"a", "b"}  # __metadata__ is not an entry
    specs = {key: entry_spec(key, entry)[0] for key, entry in header.items()}
    assert specs == specs_of(state)
    assert data_start + sum(spec.nbytes for spec in specs.values()) == (tmp_path / "ok.safetensors").stat().st_size
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((tmp_path / "ok.safetensors").read_bytes()[:20])
    with pytest.raises(ValueError, match=f"{truncated}: safetensors header of \\d+ bytes does not fit"):
        read_file_header(truncated)


def test_header_entries_are_what_safetensors_writes():
    spec = TensorSpec((2, 3), torch.float16)
    entry = header_entry("w", spec, 16)
    assert entry == {"dtype": "F16", "shape": [2, 3], "data_offsets": [16, 28]}
    assert entry_spec("w", entry) == (spec, (16, 28))
    with pytest.raises(ValueError, match="cannot store"):
        header_entry("c", TensorSpec((1,), torch.complex64), 0)
