"""Weights over Flower messages: one safetensors payload per message, each tensor at its own width."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from safetensors.torch import load as safetensors_load

from flowertune_llm.weights.tensors import TensorSpec
from flowertune_llm.weights.transport import (
    RECORD_KEY,
    RECORD_OVERHEAD,
    SAFETENSORS_STYPE,
    encoded_size,
    from_record,
    to_record,
)

from conftest import DTYPES, as_message, assert_bit_equal, record_of, through_deployment


def special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -2.5, info.max, -info.max, info.tiny, info.smallest_normal / 4, math.inf, -math.inf]
    return torch.tensor(values, dtype=torch.float32).to(dtype)


def _through_simulation(record: ArrayRecord) -> ArrayRecord:
    """The Simulation Engine's path: the message object pickled (through Ray's object store)."""
    return record_of(pickle.loads(pickle.dumps(as_message(record))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "path", [lambda r: r, _through_simulation, through_deployment], ids=["record", "pickle", "wire"]
)
def test_round_trip_is_bit_exact_at_each_width(dtype, path):
    state = {
        "w": torch.randn(5, 7).to(dtype),
        "specials": special_values(dtype),
        "nan": torch.tensor([math.nan], dtype=dtype),
        "scalar": torch.tensor(3.25, dtype=dtype),
        "empty": torch.empty(0, 4, dtype=dtype),
        "strided": torch.randn(6, 4).to(dtype).t(),  # not contiguous: sent contiguous
    }
    decoded = from_record(path(to_record(state)))
    assert_bit_equal(decoded, {k: v.contiguous() for k, v in state.items()})


def test_mixed_widths_in_one_record_through_ray_after_hashing():
    # Flower computes message ids (hashing, which caches memoryview chunks) before Ray pickles the message;
    # stdlib pickle cannot do that, Ray's cloudpickle can.
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    state = {f"t{i}": torch.randn(3, 2).to(dtype) for i, dtype in enumerate(DTYPES)}
    message = as_message(to_record(state))
    _ = message.object_id
    assert_bit_equal(from_record(record_of(cloudpickle.loads(cloudpickle.dumps(message)))), state)


def _buffer_address(data: bytes) -> int:
    return np.frombuffer(data, dtype=np.uint8).ctypes.data


def _payload(record: ArrayRecord) -> bytes:
    return record[RECORD_KEY].data


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_widths_travel_at_two_bytes_and_decode_without_a_copy(dtype):
    tensor = torch.randn(64, 32).to(dtype)
    record = to_record({"layer.weight": tensor})
    data = _payload(record)
    (header,) = np.frombuffer(data[:8], dtype="<u8")
    assert len(data) == 8 + header + tensor.numel() * 2  # no float32 anywhere on the wire
    assert record.count_bytes() == len(data) + len(RECORD_KEY)
    assert record.count_bytes() <= RECORD_OVERHEAD + encoded_size("layer.weight", TensorSpec.of(tensor))
    decoded = from_record(record)["layer.weight"]
    assert decoded.dtype == dtype
    assert decoded.data_ptr() == _buffer_address(data) + 8 + header  # a view of the message's bytes
    assert torch.equal(decoded, tensor)


def test_a_record_is_one_object_whatever_the_number_of_tensors():
    # Flower moves every Array as its own objects (one RPC each in deployment): an adapter of many small
    # tensors must not become hundreds of objects.
    state = {f"layers.{i}.lora_{ab}.weight": torch.randn(8, 4) for i in range(40) for ab in "AB"}
    def objects(record: ArrayRecord) -> int:
        return len(get_all_nested_objects(as_message(record)))

    assert objects(to_record(state)) == 5  # message, RecordDict, ArrayRecord, the Array and its one chunk
    assert objects(ArrayRecord(state)) == 3 + 2 * len(state)  # Flower's own encoding: an Array and a chunk each
    assert_bit_equal(from_record(through_deployment(to_record(state))), state)


def test_decoded_view_keeps_its_bytes_alive():
    record = to_record({"w": torch.arange(6, dtype=torch.bfloat16)})
    decoded = from_record(record)["w"]
    del record
    assert decoded.tolist() == [0, 1, 2, 3, 4, 5]


def test_the_payload_is_a_safetensors_file_and_flower_refuses_to_misread_it():
    state = {"f32": torch.randn(3, 2), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 2).bfloat16()}
    record = to_record(state)
    assert record[RECORD_KEY].stype == SAFETENSORS_STYPE
    assert_bit_equal(safetensors_load(_payload(record)), state)  # any safetensors reader reads it
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        record.to_torch_state_dict()  # loud: a stock Flower FedAvg cannot average our bytes as numbers


def test_a_record_flower_made_itself_is_refused_with_what_was_found():
    flower = ArrayRecord({"a": torch.randn(3, 4)})  # Flower's own one-Array-per-tensor npy records
    with pytest.raises(ValueError, match=r"expected one 'safetensors' Array under 'safetensors', got \{'a': 'numpy.ndarray'\}"):
        from_record(flower)


def _header(entries: dict) -> bytes:
    body = json.dumps(entries).encode()
    return len(body).to_bytes(8, "little") + body


def _f32(offsets, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "data, reason",
    [
        (_header({"w": _f32((0, 8))}) + bytes(6), "bytes \\[0, 8\\) do not follow"),  # truncated
        (_header({"w": _f32((0, 8))}) + bytes(10), "payload is 10 bytes, its header describes 8"),  # padded
        (_header({"w": _f32((0, 6), (2,))}) + bytes(6), "do not follow at 0 with 2"),  # size vs shape
        (_header({"a": _f32((0, 8)), "b": _f32((4, 12))}) + bytes(12), "b: bytes \\[4, 12\\)"),  # overlap
        (_header({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}) + bytes(1), "malformed"),
        (_header({"w": {"dtype": "F32", "shape": [2]}, "v": _f32((0, 8))}) + bytes(8), "w: malformed"),
        (_header({"w": _f32((0, 8), (-2, -1))}) + bytes(8), "negative dimension"),
        ((1000).to_bytes(8, "little") + b"{}", "header of 1000 bytes does not fit"),
        ((4).to_bytes(8, "little") + b"nope", "not valid JSON"),
        (b"abc", "shorter than its length prefix"),
    ],
)
def test_malformed_payloads_are_refused(data, reason):
    record = ArrayRecord({RECORD_KEY: Array(dtype="uint8", shape=(len(data),), stype=SAFETENSORS_STYPE, data=data)})
    with pytest.raises(ValueError, match=reason):
        from_record(record)
