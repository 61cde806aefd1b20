"""Layer-wise streaming FedAvg foundations: wire encoding, grouping, streaming mean, sharded output, mmap serving."""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

from flowertune_llm import shards as shards_module
from flowertune_llm import streaming as streaming_module
from flowertune_llm.shards import (
    CheckpointLayout,
    InsufficientDiskSpaceError,
    LocalCheckpoint,
    ShardedCheckpointWriter,
    check_disk_space,
    save_local_checkpoint,
)
from flowertune_llm.streaming import (
    Update,
    GroupMean,
    TooFewClients,
    spec_mismatch,
    streaming_fedavg,
    weighted_mean,
)
from flowertune_llm.transport import (
    RECORD_KEY,
    RECORD_OVERHEAD,
    SAFETENSORS_STYPE,
    Piece,
    TensorSpec,
    encoded_size,
    from_record,
    plan_groups,
    specs_from_json,
    specs_of,
    specs_to_json,
    take_group,
    to_record,
)

from conftest import load_bench

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    # Messages stamp the sending task's identity, which Flower sets when it starts an app.
    for name, value in {"_run_id": 7, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(bits(a[key]), bits(b[key])), key


def model_state(dtype: torch.dtype, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale).to(dtype)

    return {
        "model.embed_tokens.weight": rand(37, 8),
        "model.layers.0.input_layernorm.weight": rand(8),
        "model.layers.0.self_attn.q_proj.weight": rand(8, 8),
        "model.layers.0.mlp.down_proj.weight": rand(8, 12),
        "model.norm.weight": rand(8),
        "lm_head.weight": rand(37, 8),
    }


def special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -2.5, info.max, -info.max, info.tiny, info.smallest_normal / 4, math.inf, -math.inf]
    return torch.tensor(values, dtype=torch.float32).to(dtype)


# --- transport ---------------------------------------------------------------------------------------------


def _through_deployment(record: ArrayRecord) -> ArrayRecord:
    """The Deployment Engine's path: deflate every object of the message, inflate from those bytes alone."""
    message = Message(RecordDict({"arrays": record}), dst_node_id=1, message_type="train")
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    return inflate_object_from_contents(message.object_id, contents).content["arrays"]


def _through_simulation(record: ArrayRecord) -> ArrayRecord:
    """The Simulation Engine's path: the message object pickled (through Ray's object store)."""
    message = Message(RecordDict({"arrays": record}), dst_node_id=1, message_type="train")
    return pickle.loads(pickle.dumps(message)).content["arrays"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "path", [lambda r: r, _through_simulation, _through_deployment], ids=["record", "pickle", "wire"]
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
    message = Message(RecordDict({"arrays": to_record(state)}), dst_node_id=1, message_type="train")
    _ = message.object_id
    assert_bit_equal(from_record(cloudpickle.loads(cloudpickle.dumps(message)).content["arrays"]), state)


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
    copied = from_record(record, copy=True)["layer.weight"]
    assert copied.data_ptr() != decoded.data_ptr() and torch.equal(copied, tensor)


def test_a_record_is_one_object_whatever_the_number_of_tensors():
    # Flower moves every Array as its own objects (one RPC each in deployment): an adapter of many small
    # tensors must not become hundreds of objects.
    state = {f"layers.{i}.lora_{ab}.weight": torch.randn(8, 4) for i in range(40) for ab in "AB"}
    def objects(record: ArrayRecord) -> int:
        return len(get_all_nested_objects(Message(RecordDict({"arrays": record}), dst_node_id=1, message_type="train")))

    assert objects(to_record(state)) == 5  # message, RecordDict, ArrayRecord, the Array and its one chunk
    assert objects(ArrayRecord(state)) == 3 + 2 * len(state)  # Flower's own encoding: an Array and a chunk each
    assert_bit_equal(from_record(_through_deployment(to_record(state))), state)


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


def test_manifest_round_trip():
    specs = specs_of(model_state(torch.bfloat16))
    assert specs_from_json(specs_to_json(specs)) == specs
    assert list(specs_from_json(specs_to_json(specs))) == list(specs)


# --- grouping ----------------------------------------------------------------------------------------------


def test_groups_respect_the_budget_as_count_bytes_counts_it_and_keep_model_order():
    state = model_state(torch.bfloat16)
    budget = 900
    groups = plan_groups(specs_of(state), budget)
    assert any(len(group) > 1 for group in groups)  # several tensors per message where they fit
    for group in groups:
        record = to_record(take_group(state, group))
        assert record.count_bytes() <= budget
        bound = RECORD_OVERHEAD + sum(encoded_size(p.key, p.spec(TensorSpec.of(state[p.name]))) for p in group)
        assert bound - 40 * len(group) <= record.count_bytes() <= bound  # a bound, and a tight one
    assert [p.name for p in _dedupe(p for g in groups for p in g)] == list(state)


def _dedupe(pieces):
    seen, out = set(), []
    for piece in pieces:
        if piece.name not in seen:
            seen.add(piece.name)
            out.append(piece)
    return out


def test_a_tensor_over_budget_is_split_into_row_ranges_that_rebuild_it():
    # The 70B case in miniature: an embedding 4x the budget among small tensors.
    state = {
        "norm": torch.randn(16).bfloat16(),
        "emb": torch.randn(128, 16).bfloat16(),
        "head": torch.randn(4, 16).bfloat16(),
    }
    budget = 1100  # emb is 4096 bytes
    groups = plan_groups(specs_of(state), budget)
    emb = [p for g in groups for p in g if p.name == "emb"]
    assert len(emb) >= 4 and all(len(g) == 1 for g in groups if g[0].name == "emb")
    assert [p.rows for p in emb] == sorted(p.rows for p in emb) and emb[0].rows[0] == 0 and emb[-1].rows[1] == 128
    for group in groups:
        assert to_record(take_group(state, group)).count_bytes() <= budget
    received = {}
    for group in groups:
        received |= from_record(_through_deployment(to_record(take_group(state, group))))
    rebuilt = torch.cat([received[p.key] for p in emb])
    assert torch.equal(bits(rebuilt), bits(state["emb"]))
    assert all(Piece.parse(p.key) == p for p in emb)


def test_without_splitting_an_oversized_tensor_goes_alone():
    specs = {
        "a": TensorSpec((4,), torch.bfloat16),
        "big": TensorSpec((100, 4), torch.bfloat16),
        "b": TensorSpec((4,), torch.bfloat16),
    }
    assert plan_groups(specs, 100, split=False) == [[Piece("a")], [Piece("big")], [Piece("b")]]


def test_an_unbounded_budget_is_one_group_and_a_single_huge_row_goes_alone():
    specs = specs_of(model_state(torch.float16))
    assert plan_groups(specs, math.inf) == [[Piece(name) for name in specs]]
    wide = {"row": TensorSpec((2, 1000), torch.bfloat16)}  # one row is 2000 bytes > budget
    assert plan_groups(wide, 500) == [[Piece("row", (0, 1))], [Piece("row", (1, 2))]]


# --- streaming mean ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weighted_mean_matches_hand_computation(dtype):
    states = [{"a": torch.tensor([1.0, 2.0], dtype=dtype)}, {"a": torch.tensor([3.0, 6.0], dtype=dtype)},
              {"a": torch.tensor([-1.0, 0.0], dtype=dtype)}]  # fmt: skip
    result = weighted_mean(states, [1, 2, 5])
    # (1*1 + 2*3 + 5*-1) / 8 = 0.25 ; (1*2 + 2*6 + 5*0) / 8 = 1.75
    assert result["a"].dtype == dtype and result["a"].tolist() == [0.25, 1.75]


def test_weighted_mean_accumulates_in_float32_not_in_the_tensor_dtype():
    # 256 + 1 is not representable in bf16 (8 bits of mantissa) but is in fp32: 2 clients, mean = 128.5 -> 128.
    # Accumulating in bf16 would lose the 1 before dividing and give the same 128 here, so use three steps:
    states = [{"a": torch.tensor([256.0], dtype=torch.bfloat16)}] + [
        {"a": torch.tensor([1.0], dtype=torch.bfloat16)}
    ] * 2
    # fp32: (256 + 1 + 1) / 3 = 86.0 exactly; bf16 running sums: 256+1 -> 256, +1 -> 256, /3 -> 85.5
    assert weighted_mean(states, [1, 1, 1])["a"].item() == 86.0


def _layerwise(states, weights, budget):
    """Every client's group g folded one reply at a time (through the wire), group after group; then the
    groups' row ranges are put back together into whole tensors."""
    specs = specs_of(states[0])
    parts: dict[str, list[torch.Tensor]] = {}
    for group in plan_groups(specs, budget):
        mean = GroupMean.for_group(group, specs)
        for state, weight in zip(states, weights, strict=True):
            reply = from_record(_through_deployment(to_record(take_group(state, group))))
            assert mean.add(reply, weight) is None
        finished = mean.result()
        for piece in group:
            parts.setdefault(piece.name, []).append(finished[piece.key])
    return {name: torch.cat(pieces) for name, pieces in parts.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [[3, 11], [5, 1, 7], [0.3, 1e3, 2.5]])
def test_layerwise_equals_all_at_once_bit_for_bit(dtype, weights):
    states = [model_state(dtype, seed=k, scale=0.1 + k) for k in range(len(weights))]
    all_at_once = weighted_mean(states, weights)
    layerwise = _layerwise(states, weights, budget=300)  # splits the embeddings and the head
    assert_bit_equal(layerwise, all_at_once)
    # Not vacuous: the mean is none of the inputs, and the weights matter.
    assert not torch.equal(all_at_once["lm_head.weight"], states[0]["lm_head.weight"])
    assert not torch.equal(weighted_mean(states, weights[::-1])["lm_head.weight"], all_at_once["lm_head.weight"])


def numpy_weighted_mean(states, weights, bf16=False):
    return load_bench("numpy_mean").weighted_mean(states, weights, bf16=bf16)


def test_torch_mean_equals_the_numpy_weighted_mean_bit_for_bit_in_bf16():
    states = [model_state(torch.bfloat16, seed=k, scale=3.0) for k in range(3)]
    weights = [7, 2, 13]
    expected = numpy_weighted_mean([{k: v.view(torch.int16).numpy().view(np.uint16) for k, v in s.items()} for s in states], weights, bf16=True)
    got = weighted_mean(states, weights)
    for key in expected:
        assert got[key].view(torch.int16).numpy().view(np.uint16).tobytes() == expected[key].tobytes()


@pytest.mark.parametrize("np_dtype", [np.float16, np.float32])
def test_torch_mean_equals_the_numpy_weighted_mean_bit_for_bit(np_dtype):
    rng = np.random.default_rng(1)
    states = [
        {"a": rng.standard_normal((33, 17)).astype(np_dtype), "b": rng.standard_normal(9).astype(np_dtype)}
        for _ in range(3)
    ]
    weights = [7, 2, 13]
    expected = numpy_weighted_mean(states, weights)
    got = weighted_mean([{k: torch.from_numpy(v) for k, v in s.items()} for s in states], weights)
    for key in expected:
        assert got[key].numpy().tobytes() == expected[key].tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_folding_in_cache_sized_blocks_changes_no_bit(dtype, monkeypatch):
    states = [model_state(dtype, seed=k, scale=3.0) for k in range(3)]
    weights = [2, 9, 5]
    whole = weighted_mean(states, weights)
    monkeypatch.setattr(streaming_module, "_BLOCK", 7)  # block edges fall inside rows, tails of 1..6 elements
    assert_bit_equal(weighted_mean(states, weights), whole)
    assert_bit_equal(_layerwise(states, weights, budget=300), whole)
    if dtype != torch.bfloat16:
        expected = numpy_weighted_mean([{k: v.numpy() for k, v in s.items()} for s in states], weights)
        assert all(whole[k].numpy().tobytes() == expected[k].tobytes() for k in expected)


def _good_group():
    return {"a": torch.ones(2, 3, dtype=torch.bfloat16), "b": torch.ones(4, dtype=torch.bfloat16)}


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda g: g.pop("b"), r"tensor names differ: 1 missing \(e.g. b\), 0 unexpected"),
        (lambda g: g.update(c=torch.ones(1, dtype=torch.bfloat16)), r"1 unexpected \(e.g. c\)"),
        (
            lambda g: g.update(a=torch.ones(3, 2, dtype=torch.bfloat16)),
            r"a is bfloat16\[3, 2\], expected bfloat16\[2, 3\]",
        ),
        (lambda g: g.update(a=torch.ones(2, 3, dtype=torch.float16)), r"a is float16\[2, 3\], expected bfloat16"),
        (lambda g: g["b"].__setitem__(2, math.nan), "b holds NaN or Inf"),
        (lambda g: g["a"].__setitem__((1, 1), -math.inf), "a holds NaN or Inf"),
    ],
)
def test_malformed_groups_are_refused_with_a_reason_and_fold_nothing(mutate, reason):
    mean = GroupMean(specs_of(_good_group()))
    bad = _good_group()
    mutate(bad)
    problem = mean.add(bad, 5.0)
    assert problem is not None and __import__("re").search(reason, problem), problem
    assert mean.count == 0
    assert mean.add({k: v * 2 for k, v in _good_group().items()}, 1.0) is None
    assert mean.result()["a"].tolist() == [[2.0] * 3] * 2  # the refused reply left no trace


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, -math.nan, math.inf, -math.inf])
def test_non_finite_values_are_found_anywhere_in_a_large_tensor(dtype, bad):
    for position in (0, 4099, 10_006):  # first, inside the vectorized body, in the scalar tail
        tensor = torch.randn(10_007).to(dtype)
        tensor[position] = bad
        assert GroupMean({"x": TensorSpec.of(tensor)}).mismatch({"x": tensor}) == "x holds NaN or Inf"


def test_finite_values_that_overflow_a_sum_are_not_mistaken_for_inf():
    big = torch.full((4,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    assert GroupMean({"x": TensorSpec.of(big)}).mismatch({"x": big}) is None


def test_only_float_widths_up_to_32_bits_are_averaged():
    with pytest.raises(ValueError, match=r"steps is int64\[\]: only float32, float16 and bfloat16"):
        GroupMean({"steps": TensorSpec((), torch.int64)})


def test_spec_mismatch_on_manifests():
    specs = specs_of(_good_group())
    assert spec_mismatch(specs, specs) is None
    assert "expected bfloat16[4]" in spec_mismatch(specs, {**specs, "b": TensorSpec((5,), torch.bfloat16)})


# --- the round, group by group, into a sharded checkpoint --------------------------------------------------


def _run_round(tmp_path, states, weights, budget, name, poison=None, fail=None, arrival=list):
    specs = specs_of(states[0])
    groups = plan_groups(specs, budget)
    fetched = []

    def fetch(clients, g):
        replies = []
        for client in clients:
            fetched.append((client, g))
            if fail and (client, g) == fail:
                replies.append(Update(client, problem="no reply within the round timeout"))
                continue
            group = take_group(states[client], groups[g])
            if poison and (client, g) == poison:
                key = next(iter(group))
                group = {**group, key: torch.full_like(group[key], math.nan)}
            replies.append(Update(client, from_record(to_record(group)), weight=weights[client]))
        return arrival(replies)

    target = tmp_path / name
    result = streaming_fedavg(
        specs, groups, list(range(len(states))), fetch,
        lambda: ShardedCheckpointWriter(target, specs, max_shard_bytes=700), min_clients=1,
    )  # fmt: skip
    return result, target, groups, fetched


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layerwise_and_all_at_once_write_byte_identical_checkpoints(tmp_path, dtype):
    states = [model_state(dtype, seed=k) for k in range(3)]
    weights = [4, 1, 9]
    # Replies arrive in a different order in each mode; folding follows client order regardless.
    layer, layer_dir, groups, _ = _run_round(tmp_path, states, weights, 300, "layerwise", arrival=reversed)
    whole, whole_dir, single, _ = _run_round(tmp_path, states, weights, math.inf, "all_at_once")
    assert len(groups) > 3 and len(single) == 1
    assert layer.aggregated == whole.aggregated == [0, 1, 2]
    assert _files(layer_dir) == _files(whole_dir)
    assert len([n for n in _files(layer_dir) if n.endswith(".safetensors")]) > 1
    with LocalCheckpoint(layer_dir) as checkpoint:
        assert_bit_equal({n: checkpoint.tensor(n) for n in states[0]}, weighted_mean(states, weights))


def test_a_client_bad_in_a_later_group_restarts_the_round_without_it(tmp_path):
    states = [model_state(torch.bfloat16, seed=k) for k in range(3)]
    weights = [4, 1, 9]
    result, target, groups, fetched = _run_round(tmp_path, states, weights, 300, "out", poison=(1, 3))
    assert result.aggregated == [0, 2] and result.restarts == 1
    assert "group 4/" in result.left_out[1] and "NaN or Inf" in result.left_out[1]
    assert sum(1 for c, g in fetched if c == 0 and g == 0) == 2  # group 1 pulled again after the restart
    with LocalCheckpoint(target) as checkpoint:
        got = {n: checkpoint.tensor(n) for n in states[0]}
    assert_bit_equal(got, weighted_mean([states[0], states[2]], [4, 9]))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the abandoned attempt left nothing


def test_a_client_failing_in_the_first_group_is_skipped_without_restart(tmp_path):
    states = [model_state(torch.float16, seed=k) for k in range(3)]
    result, target, _, _ = _run_round(tmp_path, states, [1, 2, 3], 300, "out", fail=(2, 0))
    assert result.aggregated == [0, 1] and result.restarts == 0 and "round timeout" in result.left_out[2]


def test_too_few_clients_stops_the_round_and_writes_nothing(tmp_path):
    states = [model_state(torch.bfloat16, seed=k) for k in range(2)]
    specs = specs_of(states[0])
    groups = plan_groups(specs, 300)

    def fetch(clients, g):
        return [Update(client, problem="gone") for client in clients]

    with pytest.raises(TooFewClients):
        streaming_fedavg(specs, groups, [0, 1], fetch, lambda: ShardedCheckpointWriter(tmp_path / "o", specs))
    assert list(tmp_path.iterdir()) == []


# --- sharded writer ----------------------------------------------------------------------------------------


def _tiny_llama(dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=96,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype), config


def test_sharded_output_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, config = _tiny_llama()
    state = model.state_dict()
    (tmp_path / "config").mkdir()
    config.save_pretrained(tmp_path / "config")
    target = tmp_path / "merged"
    groups = plan_groups(specs_of(state), 5000)  # the embedding and head (6 KB each) are split
    assert any(p.rows for g in groups for p in g)
    with ShardedCheckpointWriter(target, specs_of(state), max_shard_bytes=20_000) as writer:
        for group in groups:
            for key, tensor in take_group(state, group).items():
                writer.write(key, tensor.clone())
        writer.add_file("config.json", tmp_path / "config" / "config.json")
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and index["metadata"]["total_size"] == sum(
        t.nbytes for t in state.values()
    )
    shard_names = sorted(n for n in os.listdir(target) if n.endswith(".safetensors"))
    assert shard_names[0] == f"model-00001-of-{len(shard_names):05d}.safetensors" and len(shard_names) > 1
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
    assert_bit_equal(dict(loaded.state_dict()), dict(state))
    assert oct((target).stat().st_mode & 0o777) == "0o755"


def test_single_shard_matches_safetensors_own_file(tmp_path):
    state = {"a": torch.randn(3, 4).bfloat16(), "b": torch.randn(5).bfloat16()}  # one width, names in order
    save_local_checkpoint(state, tmp_path / "ours")
    save_file(state, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert os.listdir(tmp_path / "ours") == ["model.safetensors"]
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


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


class Boom(RuntimeError):
    pass


def test_an_interrupted_write_leaves_nothing_behind(tmp_path):
    state = model_state(torch.bfloat16)
    with pytest.raises(Boom):
        with ShardedCheckpointWriter(tmp_path / "out", specs_of(state), max_shard_bytes=400) as writer:
            writer.write("model.embed_tokens.weight", state["model.embed_tokens.weight"])
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_checkpoint_and_a_good_one_replaces_it(tmp_path):
    old, new = model_state(torch.bfloat16, seed=1), model_state(torch.bfloat16, seed=2)
    save_local_checkpoint(old, tmp_path / "out", max_shard_bytes=400)
    before = _files(tmp_path / "out")
    with pytest.raises(Boom):
        with ShardedCheckpointWriter(tmp_path / "out", specs_of(new), max_shard_bytes=400) as writer:
            writer.write("lm_head.weight", new["lm_head.weight"])
            raise Boom
    assert _files(tmp_path / "out") == before and [p.name for p in tmp_path.iterdir()] == ["out"]
    save_local_checkpoint(new, tmp_path / "out", max_shard_bytes=400)
    with LocalCheckpoint(tmp_path / "out") as checkpoint:
        assert_bit_equal({n: checkpoint.tensor(n) for n in new}, new)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_incomplete_checkpoint_is_never_committed(tmp_path):
    state = {"emb": torch.randn(10, 4).bfloat16(), "norm": torch.randn(4).bfloat16()}
    with pytest.raises(ValueError, match=r"incomplete: 1 tensor\(s\) not written, e.g. emb\[6:10\]"):
        with ShardedCheckpointWriter(tmp_path / "out", specs_of(state)) as writer:
            writer.write("norm", state["norm"])
            writer.write(Piece("emb", (0, 6)), state["emb"][:6])
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_a_piece_of_the_wrong_shape_or_dtype(tmp_path):
    state = {"emb": torch.randn(10, 4).bfloat16()}
    with ShardedCheckpointWriter(tmp_path / "out", specs_of(state)) as writer:
        with pytest.raises(ValueError, match=r"emb\[0:5\] is bfloat16\[4, 4\], expected bfloat16\[5, 4\]"):
            writer.write("emb[0:5]", state["emb"][:4])
        with pytest.raises(ValueError, match="expected bfloat16"):
            writer.write("emb", state["emb"].float())
        with pytest.raises(ValueError, match="no such tensor"):
            writer.write("other", state["emb"])
        writer.write("emb[5:10]", state["emb"][5:])
        writer.write("emb[0:5]", state["emb"][:5])
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["emb"], state["emb"])


def test_a_partial_directory_left_by_a_killed_writer_is_removed(tmp_path):
    stale = tmp_path / ".out.partial-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    save_local_checkpoint({"a": torch.ones(2)}, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- disk space --------------------------------------------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def test_disk_check_names_the_directory_and_the_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 1_500_000, 1_500_000))
    target = tmp_path / "runs" / "round-3"  # need not exist yet
    with pytest.raises(InsufficientDiskSpaceError) as error:
        check_disk_space(target, 141_000_000_000)
    message = str(error.value)
    assert str(target) in message
    assert "141.0 GB (141,000,000,000 bytes)" in message and "1.5 MB (1,500,000 bytes) are free" in message
    assert check_disk_space(target, 1_000_000) == 1_500_000


def test_writer_checks_disk_space_before_creating_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 100, 100))
    state = model_state(torch.bfloat16)
    needed = CheckpointLayout.plan(specs_of(state)).total_bytes
    with pytest.raises(InsufficientDiskSpaceError, match=f"{needed:,} bytes"):
        with ShardedCheckpointWriter(tmp_path / "out", specs_of(state)):
            pytest.fail("the block must not run")
    assert list(tmp_path.iterdir()) == []


def test_layout_total_bytes_is_what_lands_on_disk(tmp_path):
    state = model_state(torch.float16)
    save_local_checkpoint(state, tmp_path / "out", max_shard_bytes=300)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert on_disk == CheckpointLayout.plan(specs_of(state), 300).total_bytes


# --- serving from mmap -------------------------------------------------------------------------------------


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
        for group in checkpoint.iter_groups(groups):
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


def test_save_local_checkpoint_keeps_tied_weights_under_both_names(tmp_path):
    embedding = torch.randn(8, 4).bfloat16()
    state = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding}  # shared storage
    save_local_checkpoint(state, tmp_path / "ck")
    with LocalCheckpoint(tmp_path / "ck") as checkpoint:
        assert set(checkpoint.specs) == set(state)
        assert torch.equal(checkpoint.tensor("lm_head.weight"), embedding)


# --- synthetic model ---------------------------------------------------------------------------------------


def test_synthetic_llama_is_a_loadable_llama_written_in_chunks(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    synthetic = load_bench("synthetic_llama")
    shapes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=200)
    summary = synthetic.build(tmp_path / "m", layers=2, seed=3, chunk_bytes=1024, max_shard_bytes=8000, **shapes)
    assert summary["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "m").iterdir())
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert config.model_type == "llama" and config.num_hidden_layers == 2 and config.hidden_size == 32
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.float().std().item() == pytest.approx(0.02, rel=0.1)
    synthetic.build(tmp_path / "again", layers=2, seed=3, chunk_bytes=1024, max_shard_bytes=8000, **shapes)
    assert _files(tmp_path / "m") == _files(tmp_path / "again")  # same seed, same bytes
    synthetic.build(tmp_path / "other", layers=2, seed=4, chunk_bytes=1024, max_shard_bytes=8000, **shapes)
    assert _files(tmp_path / "m") != _files(tmp_path / "other")


def test_synthetic_llama_has_the_70b_shapes():
    synthetic = load_bench("synthetic_llama")
    specs = synthetic.tensor_specs(synthetic.llama_config(1))
    assert specs["model.embed_tokens.weight"] == TensorSpec((128256, 8192), torch.bfloat16)
    assert specs["model.layers.0.self_attn.k_proj.weight"].shape == (1024, 8192)
    assert specs["model.layers.0.mlp.down_proj.weight"].shape == (8192, 28672)
    layer = sum(s.nbytes for n, s in specs.items() if n.startswith("model.layers.0."))
    assert layer == 1_711_308_800  # 1.6 GiB per decoder layer in bf16
