"""Server optimizers on the pseudo-gradient: the math against a NumPy reference (bit for bit) and against
Flower's own classes, layer-wise = all-at-once, and the state that carries from round to round on disk."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from functools import partial

import numpy as np
import pytest
import torch

from flowertune_llm.weights.groups import plan_groups
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.server_optimizers import (
    SERVER_OPTIMIZERS,
    STATE_DIR,
    OptimizerRound,
    ServerOptimizer,
    previous_state,
)
from flowertune_llm.weights.shards import ShardedCheckpointWriter, save_local_checkpoint
from flowertune_llm.weights.streaming import Update, streaming_fedavg
from flowertune_llm.weights.tensors import specs_of
from flowertune_llm.weights.transport import from_record, to_record
from testbed.reference import server_optimizer_rounds

from conftest import assert_bit_equal, files_of, model_state, pieces_of

SETTINGS = {"learning_rate": 0.1, "momentum": 0.9, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
ROUNDS = 4
WEIGHTS = [3, 1, 2]


def optimizer(kind: str, **changes) -> ServerOptimizer:
    return ServerOptimizer(kind, **{**SETTINGS, **changes})


# --- the app's path: streaming_fedavg + OptimizerRound, checkpoints and state on disk --------------------------


@contextmanager
def output_with_state(target, specs, step):
    writer = ShardedCheckpointWriter(target, specs, max_shard_bytes=700)
    writer.open()
    step.open_inside(writer)
    try:
        yield writer
    except BaseException:
        step.abort()
        writer.abort()
        raise
    step.commit()
    writer.commit()


def app_rounds(tmp_path, opt, start, rounds_of_updates, budget, name):
    specs = specs_of(start)
    groups = plan_groups(specs, budget)
    current = save_local_checkpoint(start, tmp_path / name / "round-0")
    for t, updates in enumerate(rounds_of_updates, start=1):
        def fetch(clients, g, updates=updates):
            return [Update(c, from_record(to_record(pieces_of(updates[c], groups[g]))), weight=WEIGHTS[c]) for c in clients]

        target = tmp_path / name / f"round-{t}"
        state_dir = previous_state(current)
        with LocalCheckpoint(current) as before, ExitStack() as stack:
            previous = stack.enter_context(LocalCheckpoint(state_dir)) if state_dir else None
            step = OptimizerRound(opt, t, specs, before, previous)
            output = partial(output_with_state, target, specs, step)
            streaming_fedavg(specs, groups, [0, 1, 2], fetch, output, apply=step)
        current = target
    with LocalCheckpoint(current) as final, LocalCheckpoint(current / STATE_DIR) as state:
        return {n: final.tensor(n).clone() for n in start}, {n: state.tensor(n).clone() for n in state.specs}, current


def updates_for(rounds, dtype, seed=0):
    """Each round, three clients' updates near the previous ones (so steps are small and realistic)."""
    return [[model_state(dtype, seed=100 * t + c + seed, scale=0.5) for c in range(3)] for t in range(rounds)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", SERVER_OPTIMIZERS)
def test_each_optimizer_equals_the_numpy_reference_bit_for_bit_over_several_rounds(tmp_path, kind, dtype):
    start = model_state(dtype, seed=7)
    updates = updates_for(ROUNDS, dtype)
    model, state, _ = app_rounds(tmp_path, optimizer(kind), start, updates, math.inf, "app")
    expected_model, expected_state = server_optimizer_rounds(kind, SETTINGS, start, updates, WEIGHTS)
    assert_bit_equal(model, expected_model)
    assert_bit_equal(state, expected_state)
    assert not torch.equal(model["lm_head.weight"].float(), start["lm_head.weight"].float())


@pytest.mark.parametrize("kind", SERVER_OPTIMIZERS)
def test_layerwise_and_all_at_once_give_the_same_bytes_model_and_state(tmp_path, kind):
    start = model_state(torch.bfloat16, seed=3)
    updates = updates_for(3, torch.bfloat16, seed=1)
    *_, layerwise = app_rounds(tmp_path, optimizer(kind), start, updates, 300, "layerwise")  # row ranges too
    *_, whole = app_rounds(tmp_path, optimizer(kind), start, updates, math.inf, "whole")
    assert len(plan_groups(specs_of(start), 300)) > 3
    assert files_of(layerwise) == files_of(whole)
    assert files_of(layerwise / STATE_DIR) == files_of(whole / STATE_DIR)


def test_the_state_written_is_the_state_read_next_round_and_is_float32_per_weight(tmp_path):
    start = model_state(torch.bfloat16, seed=5)
    _, state, last = app_rounds(tmp_path, optimizer("fedadam"), start, updates_for(2, torch.bfloat16), 300, "run")
    assert set(state) == {f"{s}.{n}" for s in ("m", "v") for n in start}
    assert all(t.dtype == torch.float32 and t.shape == start[n.split(".", 1)[1]].shape for n, t in state.items())
    assert (state["v.lm_head.weight"] >= 0).all()
    assert previous_state(last) == last / STATE_DIR and previous_state(tmp_path / "run" / "round-0") is None


# --- against Flower's own strategies --------------------------------------------------------------------------


def flower_strategy(kind):
    from flwr.serverapp import strategy

    s = SETTINGS
    if kind == "fedavgm":
        return strategy.FedAvgM(server_learning_rate=s["learning_rate"], server_momentum=s["momentum"])
    if kind == "fedadagrad":  # Flower fixes beta_1 at 0
        return strategy.FedAdagrad(eta=s["learning_rate"], tau=s["tau"])
    cls = strategy.FedAdam if kind == "fedadam" else strategy.FedYogi
    return cls(eta=s["learning_rate"], beta_1=s["beta_1"], beta_2=s["beta_2"], tau=s["tau"])


@pytest.mark.parametrize("kind", SERVER_OPTIMIZERS)
def test_each_optimizer_agrees_with_flowers_strategy_class(tmp_path, kind, server_identity):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    start = model_state(torch.float32, seed=11)
    updates = updates_for(ROUNDS, torch.float32, seed=2)
    ours = optimizer(kind, **({"beta_1": 0.0} if kind == "fedadagrad" else {}))
    model, *_ = app_rounds(tmp_path, ours, start, updates, 300, "app")

    flower = flower_strategy(kind)
    current = {k: v.numpy().copy() for k, v in start.items()}
    if kind == "fedavgm":
        flower.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    for t, round_updates in enumerate(updates, start=1):
        if kind != "fedavgm":
            flower.current_arrays = current  # what configure_train records each round
        replies = [
            Message(RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in u.items()}),
                                "metrics": MetricRecord({"num-examples": w})}), dst_node_id=c + 1, message_type="train")
            for c, (u, w) in enumerate(zip(round_updates, WEIGHTS, strict=True))
        ]  # fmt: skip
        arrays, _ = flower.aggregate_train(t, replies)
        current = {k: arrays[k].numpy().astype(np.float32) for k in start}
    for key, value in model.items():
        np.testing.assert_allclose(value.numpy(), current[key], rtol=2e-6, atol=2e-7, err_msg=key)


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown server optimizer 'fedsgd'"):
        optimizer("fedsgd")


def test_fedadam_rate_is_bias_corrected_as_flower_does_and_the_others_are_not():
    adam = optimizer("fedadam")
    assert adam.rate(1) == pytest.approx(0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2))
    assert adam.rate(1000) == pytest.approx(0.1, rel=1e-3)
    assert optimizer("fedyogi").rate(1) == optimizer("fedadagrad").rate(5) == 0.1
