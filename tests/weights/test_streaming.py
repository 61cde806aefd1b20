"""The weighted mean, group by group and reply by reply: exact arithmetic, fixed order, refusals, restarts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowertune_llm.weights import streaming as streaming_module
from flowertune_llm.weights.groups import plan_groups
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.shards import ShardedCheckpointWriter
from flowertune_llm.weights.streaming import (
    GroupMean,
    TooFewClients,
    Update,
    spec_mismatch,
    streaming_fedavg,
)
from flowertune_llm.weights.tensors import TensorSpec, specs_of
from flowertune_llm.weights.transport import from_record, to_record
from testbed.reference import torch_weighted_mean
from testbed.reference import weighted_mean as numpy_mean

from conftest import (
    DTYPES,
    assert_bit_equal,
    files_of,
    model_state,
    pieces_of,
    through_deployment,
)


def one_group_mean(states, weights):
    """The all-at-once mean: every tensor in one group, clients folded in order."""
    mean = GroupMean(specs_of(states[0]))
    for state, weight in zip(states, weights, strict=True):
        assert mean.add(state, weight) is None
    return mean.result()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weighted_mean_matches_hand_computation(dtype):
    states = [{"a": torch.tensor([1.0, 2.0], dtype=dtype)}, {"a": torch.tensor([3.0, 6.0], dtype=dtype)},
              {"a": torch.tensor([-1.0, 0.0], dtype=dtype)}]  # fmt: skip
    result = one_group_mean(states, [1, 2, 5])
    # (1*1 + 2*3 + 5*-1) / 8 = 0.25 ; (1*2 + 2*6 + 5*0) / 8 = 1.75
    assert result["a"].dtype == dtype and result["a"].tolist() == [0.25, 1.75]


def test_weighted_mean_accumulates_in_float32_not_in_the_tensor_dtype():
    # 256 + 1 is not representable in bf16 (8 bits of mantissa) but is in fp32: 2 clients, mean = 128.5 -> 128.
    # Accumulating in bf16 would lose the 1 before dividing and give the same 128 here, so use three steps:
    states = [{"a": torch.tensor([256.0], dtype=torch.bfloat16)}] + [
        {"a": torch.tensor([1.0], dtype=torch.bfloat16)}
    ] * 2
    # fp32: (256 + 1 + 1) / 3 = 86.0 exactly; bf16 running sums: 256+1 -> 256, +1 -> 256, /3 -> 85.5
    assert one_group_mean(states, [1, 1, 1])["a"].item() == 86.0


def _layerwise(states, weights, budget):
    """Every client's group g folded one reply at a time (through the wire), group after group; then the
    groups' row ranges are put back together into whole tensors."""
    specs = specs_of(states[0])
    parts: dict[str, list[torch.Tensor]] = {}
    for group in plan_groups(specs, budget):
        mean = GroupMean.for_group(group, specs)
        for state, weight in zip(states, weights, strict=True):
            reply = from_record(through_deployment(to_record(pieces_of(state, group))))
            assert mean.add(reply, weight) is None
        finished = mean.result()
        for piece in group:
            parts.setdefault(piece.name, []).append(finished[piece.key])
    return {name: torch.cat(pieces) for name, pieces in parts.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [[3, 11], [5, 1, 7], [0.3, 1e3, 2.5]])
def test_layerwise_equals_all_at_once_bit_for_bit(dtype, weights):
    states = [model_state(dtype, seed=k, scale=0.1 + k) for k in range(len(weights))]
    all_at_once = one_group_mean(states, weights)
    layerwise = _layerwise(states, weights, budget=300)  # splits the embeddings and the head
    assert_bit_equal(layerwise, all_at_once)
    # Not vacuous: the mean is none of the inputs, and the weights matter.
    assert not torch.equal(all_at_once["lm_head.weight"], states[0]["lm_head.weight"])
    assert not torch.equal(one_group_mean(states, weights[::-1])["lm_head.weight"], all_at_once["lm_head.weight"])


def test_torch_mean_equals_the_numpy_weighted_mean_bit_for_bit_in_bf16():
    states = [model_state(torch.bfloat16, seed=k, scale=3.0) for k in range(3)]
    weights = [7, 2, 13]
    expected = numpy_mean([{k: v.view(torch.int16).numpy().view(np.uint16) for k, v in s.items()} for s in states], weights, bf16=True)
    got = one_group_mean(states, weights)
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
    expected = numpy_mean(states, weights)
    got = one_group_mean([{k: torch.from_numpy(v) for k, v in s.items()} for s in states], weights)
    for key in expected:
        assert got[key].numpy().tobytes() == expected[key].tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_folding_in_cache_sized_blocks_changes_no_bit(dtype, monkeypatch):
    states = [model_state(dtype, seed=k, scale=3.0) for k in range(3)]
    weights = [2, 9, 5]
    whole = one_group_mean(states, weights)
    monkeypatch.setattr(streaming_module, "_BLOCK", 7)  # block edges fall inside rows, tails of 1..6 elements
    assert_bit_equal(one_group_mean(states, weights), whole)
    assert_bit_equal(_layerwise(states, weights, budget=300), whole)
    if dtype != torch.bfloat16:
        expected = numpy_mean([{k: v.numpy() for k, v in s.items()} for s in states], weights)
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
            group = pieces_of(states[client], groups[g])
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layerwise_and_all_at_once_write_byte_identical_checkpoints(tmp_path, dtype):
    states = [model_state(dtype, seed=k) for k in range(3)]
    weights = [4, 1, 9]
    # Replies arrive in a different order in each mode; folding follows client order regardless.
    layer, layer_dir, groups, _ = _run_round(tmp_path, states, weights, 300, "layerwise", arrival=reversed)
    whole, whole_dir, single, _ = _run_round(tmp_path, states, weights, math.inf, "all_at_once")
    assert len(groups) > 3 and len(single) == 1
    assert layer.aggregated == whole.aggregated == [0, 1, 2]
    assert files_of(layer_dir) == files_of(whole_dir)
    assert len([n for n in files_of(layer_dir) if n.endswith(".safetensors")]) > 1
    with LocalCheckpoint(layer_dir) as checkpoint:
        assert_bit_equal({n: checkpoint.tensor(n) for n in states[0]}, torch_weighted_mean(states, weights))


def test_a_client_bad_in_a_later_group_restarts_the_round_without_it(tmp_path):
    states = [model_state(torch.bfloat16, seed=k) for k in range(3)]
    weights = [4, 1, 9]
    result, target, _, fetched = _run_round(tmp_path, states, weights, 300, "out", poison=(1, 3))
    assert result.aggregated == [0, 2] and result.restarts == 1
    assert "group 4/" in result.left_out[1] and "NaN or Inf" in result.left_out[1]
    assert sum(1 for c, g in fetched if c == 0 and g == 0) == 2  # group 1 pulled again after the restart
    with LocalCheckpoint(target) as checkpoint:
        got = {n: checkpoint.tensor(n) for n in states[0]}
    assert_bit_equal(got, torch_weighted_mean([states[0], states[2]], [4, 9]))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the abandoned attempt left nothing


def test_a_client_failing_in_the_first_group_is_skipped_without_restart(tmp_path):
    states = [model_state(torch.float16, seed=k) for k in range(3)]
    result, _, _, _ = _run_round(tmp_path, states, [1, 2, 3], 300, "out", fail=(2, 0))
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
