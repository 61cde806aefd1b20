"""The server's round loop against an in-process grid whose nodes run the real client handlers.

The grid (testbed/grids.py) stands in for Flower's so that an error reply, a malformed update or a node that never
answers can be produced deterministically; the real engines run in test_simulation.py and test_deployment.py.
Nodes here hold known weights (aggregation-only runs of small full models, each node its own checkpoint),
so every average can be checked against a hand computation, bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from flowertune_llm.config import to_flat_dict
from flowertune_llm.federated import protocol, start
from flowertune_llm.federated.run_directory import RunDirectory
from flowertune_llm.federated.strategy import RoundFailed, StreamingStrategy
from flowertune_llm.weights import disk
from flowertune_llm.weights.disk import InsufficientDiskSpaceError
from flowertune_llm.weights.exchange import Exchange
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.shards import save_local_checkpoint
from flowertune_llm.weights.tensors import specs_of
from flowertune_llm.weights.transport import to_record
from testbed.grids import Behaviour, InProcessNode, ScriptedGrid, error_reply
from testbed.reference import torch_weighted_mean

from conftest import assert_bit_equal, files_of, make_config

Misbehaviour = Callable[[InProcessNode], Behaviour]  # what a node does instead of (or around) the real handlers


def fails_on(message_type: str) -> Misbehaviour:
    def wrap(node: InProcessNode) -> Behaviour:
        return lambda message: (
            error_reply(message, "CUDA out of memory") if message.metadata.message_type == message_type else node(message)
        )

    return wrap


def silent(node: InProcessNode) -> Behaviour:
    return lambda message: None


def full_model(seed: int, dtype=torch.bfloat16, fill: float | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (64, 16), "layers.0.proj.weight": (32, 16), "layers.0.norm.weight": (16,),
              "layers.1.proj.weight": (32, 16), "head.weight": (64, 16)}  # fmt: skip
    return {
        name: (torch.full(shape, fill) if fill is not None else torch.randn(shape, generator=generator)).to(dtype)
        for name, shape in shapes.items()
    }


def full_weights_run(tmp_path, states, weights, behaviours=None, mode="layerwise", name="run", base=None, **overrides):
    """An aggregation-only run of a small full model: node k holds ``states[k]`` with FedAvg weight ``weights[k]``;
    ``base``: the model a server optimizer steps from in round 1."""
    settings = {"num-server-rounds": 2, "train.save-every-round": 1, "strategy.fraction-train": 1.0,
                "train.training-arguments.max-steps": 0, "aggregation.mode": mode,
                "aggregation.max-message-mb": 1.5 / 1024}  # 1.5 KiB: several groups, and the embedding split  # fmt: skip
    settings.update(overrides)
    config = make_config(**settings)
    nodes = {}
    for k, (state, weight) in enumerate(zip(states, weights), start=1):
        model_dir = save_local_checkpoint(state, tmp_path / "models" / f"node-{k}")
        node_config = {"model-path": str(model_dir), "aggregation-weight": weight, "state-dir": str(tmp_path / "nodes")}
        nodes[k] = InProcessNode(to_flat_dict(config), k, node_config)
    exchange = Exchange.for_full_model(config, specs_of(states[0]), {"config.json": b"{}"})
    run_dir = RunDirectory.create(tmp_path / name, 7, {})
    base_dir = save_local_checkpoint(base, tmp_path / "models" / "base") if base is not None else None
    strategy = StreamingStrategy(config, run_dir, exchange, base=base_dir)
    grid = ScriptedGrid({k: (behaviours or {}).get(k, lambda n: n)(node) for k, node in nodes.items()})
    final = strategy.run(grid, None)
    return strategy, grid, final, run_dir


def group_of(message) -> int:
    return protocol.ReceiveIns.from_content(message.content).group.index


def read(checkpoint) -> dict[str, torch.Tensor]:
    with LocalCheckpoint(checkpoint) as loaded:
        return {name: loaded.tensor(name).clone() for name in loaded.specs}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layerwise_equals_all_at_once_and_the_exact_weighted_mean(tmp_path, dtype):
    states = [full_model(seed, dtype) for seed in range(3)]
    weights = [4.0, 1.0, 9.0]
    layer, grid, layer_final, _ = full_weights_run(tmp_path, states, weights, name="layerwise")
    whole, _, whole_final, _ = full_weights_run(tmp_path, states, weights, mode="all_at_once", name="whole")
    assert layer.history[0].groups > 3 and whole.history[0].groups == 1
    expected = torch_weighted_mean(states, weights)
    assert_bit_equal(read(layer_final), expected)
    assert files_of(layer_final) == files_of(whole_final)
    # Round 1 sends nothing down (the nodes hold the model); round 2 sends the mean down group by group.
    first, second = layer.history
    assert first.bytes_down == 0 and second.bytes_down == first.bytes_up > 0
    # Each node is asked its name once; then round 1 trains (nothing goes down: the nodes hold the model).
    assert [m.metadata.message_type for m in grid.sent[:4]] == [protocol.QUERY] * 3 + [protocol.TRAIN]
    assert {m.metadata.message_type for m in grid.sent} == {protocol.QUERY, protocol.TRAIN, protocol.SEND, protocol.RECEIVE}
    assert first.aggregated == ["node-1", "node-2", "node-3"] and first.failures == {}


@pytest.mark.parametrize("window", [1, 3])
def test_group_messages_go_a_window_ahead_and_change_no_bit(tmp_path, window):
    states = [full_model(seed) for seed in range(3)]
    strategy, grid, final, _ = full_weights_run(tmp_path, states, [2, 1, 1], **{"aggregation.window": window})
    assert strategy.history[0].groups > window + 1
    # Replies wait in the grid (the SuperLink) for the server to pull them group by group: a window per node.
    assert grid.most_waiting[protocol.RECEIVE] == grid.most_waiting[protocol.SEND] == 3 * window
    assert_bit_equal(read(final), torch_weighted_mean(states, [2, 1, 1]))


def test_a_node_silent_within_the_window_is_waited_for_once(tmp_path):
    def silent_after_the_first_group_down(node: InProcessNode) -> Behaviour:
        return lambda m: None if m.metadata.message_type == protocol.RECEIVE and group_of(m) > 0 else node(m)

    states = [full_model(seed) for seed in range(3)]
    strategy, grid, final, _ = full_weights_run(
        tmp_path, states, [1, 1, 1], {3: silent_after_the_first_group_down},
        **{"aggregation.window": 3, "strategy.round-timeout": 0.3},
    )  # fmt: skip
    assert "group 2 down: no reply" in strategy.history[1].failures["node-3"]
    to_node_3 = [m for m in grid.sent if m.metadata.dst_node_id == 3 and m.metadata.message_type == protocol.RECEIVE]
    assert [group_of(m) for m in to_node_3] == [0, 1, 2, 3]  # group 1 alone, then 3 in flight
    assert [m.metadata.message_id in grid.asked for m in to_node_3] == [True, True, False, False]
    # Round 2 averages the round-1 mean of all three, which nodes 1 and 2 received whole.
    assert strategy.history[1].aggregated == ["node-1", "node-2"]
    assert_bit_equal(read(final), torch_weighted_mean(states, [1, 1, 1]))


def test_bytes_are_counted_per_message_each_way(tmp_path):
    states = [full_model(seed) for seed in range(2)]
    strategy, grid, _, _ = full_weights_run(tmp_path, states, [1, 1])
    down = sum(r.count_bytes() for r in (protocol.arrays_of(m.content) for m in grid.sent) if r is not None)
    assert sum(r.bytes_down for r in strategy.history) == down
    payload = to_record(states[0]).count_bytes()  # the pieces' keys and headers differ from the whole tensors'
    assert strategy.history[0].bytes_up == pytest.approx(2 * payload, rel=0.2)
    assert strategy.total_bytes == sum(r.bytes_down + r.bytes_up for r in strategy.history)


def test_failed_malformed_and_silent_nodes_are_named_and_left_out(tmp_path, caplog):
    states = [full_model(seed) for seed in range(6)]
    # Node k holds states[k - 1].
    states[4] = {**states[4], "head.weight": torch.zeros(64, 8, dtype=torch.bfloat16)}
    states[5] = {**states[5], "layers.1.proj.weight": torch.full((32, 16), math.nan, dtype=torch.bfloat16)}
    behaviours = {3: fails_on(protocol.TRAIN), 4: silent}
    strategy, _, final, _ = full_weights_run(
        tmp_path, states, [1] * 6, behaviours, **{"num-server-rounds": 1, "strategy.round-timeout": 0.5}
    )
    record = strategy.history[0]
    assert record.aggregated == ["node-1", "node-2"]
    assert "CUDA out of memory" in record.failures["node-3"]
    assert "no reply within strategy.round-timeout=0.5s" in record.failures["node-4"]
    assert "head.weight is bfloat16[64, 8], expected bfloat16[64, 16]" in record.failures["node-5"]
    assert "layers.1.proj.weight" in record.failures["node-6"] and "NaN or Inf" in record.failures["node-6"]
    assert record.restarts == 1  # node 6 failed after its first group was folded
    assert_bit_equal(read(final), torch_weighted_mean(states[:2], [1, 1]))
    for node in (3, 4, 5, 6):
        assert f"node-{node} left out" in caplog.text


def test_a_node_failing_while_the_model_goes_down_is_left_out_before_training(tmp_path):
    states = [full_model(seed) for seed in range(3)]
    strategy, _, _, _ = full_weights_run(tmp_path, states, [1, 1, 1], {3: fails_on(protocol.RECEIVE)})
    assert "group 1 down" in strategy.history[1].failures["node-3"]
    assert strategy.history[1].aggregated == ["node-1", "node-2"]


def test_too_few_usable_updates_stop_the_run_and_leave_no_checkpoint(tmp_path):
    states = [full_model(seed) for seed in range(2)]
    with pytest.raises(RoundFailed, match="1 usable update\\(s\\), fewer than strategy.min-train-nodes=2"):
        full_weights_run(tmp_path, states, [1, 1], {2: fails_on(protocol.TRAIN)})
    assert not list((tmp_path / "run").rglob("*.safetensors"))


def test_not_enough_disk_is_reported_before_anything_is_sent(tmp_path, monkeypatch):
    states = [full_model(seed) for seed in range(2)]
    real = disk.shutil.disk_usage
    # Only the server's output directory is short of space.
    monkeypatch.setattr(
        disk.shutil, "disk_usage",
        lambda path: real(path)._replace(free=1000) if (tmp_path / "run") in (Path(path), *Path(path).parents) else real(path),
    )  # fmt: skip
    grids = []
    monkeypatch.setattr(ScriptedGrid, "push_messages", lambda self, m: grids.append(m) or [])
    with pytest.raises(InsufficientDiskSpaceError, match="round-1 checkpoint"):
        full_weights_run(tmp_path, states, [1, 1])
    assert grids == []


def test_sampling_takes_the_fraction_but_at_least_the_minimum(tmp_path):
    states = [full_model(seed) for seed in range(20)]
    strategy, _, _, _ = full_weights_run(
        tmp_path, states, [1] * 20, **{"strategy.fraction-train": 0.25, "strategy.min-train-nodes": 2}
    )
    assert [len(r.nodes) for r in strategy.history] == [5, 5]


def test_checkpoints_every_n_rounds_and_after_the_last(tmp_path):
    states = [full_model(seed) for seed in range(2)]
    _, _, final, run_dir = full_weights_run(
        tmp_path, states, [1, 1], **{"num-server-rounds": 5, "train.save-every-round": 2}
    )
    saved = sorted(p.name for p in (run_dir.path / "checkpoints").iterdir())
    assert saved == ["round-2", "round-4", "round-5"] and final.name == "round-5"
    history = json.loads((run_dir.path / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5] and all(r["train_loss"] is None for r in history)


def adapter_run(tmp_path, mode, behaviours=None, run_id=7, node_ids=(1, 2), **overrides):
    """A training run of two in-process nodes (partitions 0 and 1 of 4), set up as the ServerApp sets one up."""
    overrides.setdefault("output.dir", str(tmp_path / f"runs-{mode}"))
    config = make_config(**{"num-server-rounds": 2, "train.save-every-round": 1, "strategy.fraction-train": 1.0,
                            "aggregation.mode": mode, "aggregation.max-message-mb": 2 / 1024, **overrides})  # fmt: skip
    source = start.check(config)
    run_dir, resumed = start.run_directory(config, run_id, source)
    exchange, initial = start.global_model(config, run_dir, write_initial=resumed is None)
    nodes = {k: InProcessNode(to_flat_dict(config), k, {"partition-id": p, "num-partitions": 4,
                                                        "state-dir": str(tmp_path / "node-state")}, run_id=run_id)
             for p, k in enumerate(node_ids)}  # fmt: skip
    grid = ScriptedGrid({k: (behaviours or {}).get(k, lambda n: n)(node) for k, node in nodes.items()})
    strategy = StreamingStrategy(config, run_dir, exchange, resume=resumed)
    state = read(run_dir.checkpoint_dir(0)) if initial else None
    final = strategy.run(grid, initial)
    return config, strategy, grid, state, final


def test_adapter_rounds_train_and_both_modes_write_the_same_peft_adapter(tmp_path):
    config, layer, grid, state, layer_final = adapter_run(tmp_path, "layerwise")
    _, whole, _, _, whole_final = adapter_run(tmp_path, "all_at_once")
    assert layer.history[0].groups > 1 and whole.history[0].groups == 1
    assert sorted(p.name for p in layer_final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "flowertune_state.json"]
    assert all(r.train_loss > 0 and r.aggregated == ["partition-0", "partition-1"] for r in layer.history)
    assert [r.train_loss for r in layer.history] == [r.train_loss for r in whole.history]
    assert files_of(layer_final) == files_of(whole_final)
    lr = [protocol.TrainIns.from_content(m.content).learning_rate for m in grid.sent if m.metadata.message_type == protocol.TRAIN]
    assert lr[0] == pytest.approx(config.train.learning_rate_max)
    assert lr[-1] == pytest.approx(config.train.learning_rate_min)
    trained = read(layer_final)
    assert trained.keys() == state.keys() and any(not torch.equal(trained[k], state[k]) for k in state)
    assert not layer_final.with_name("round-0").exists()  # the initial adapter was scratch


def test_federated_evaluation_scores_the_new_global_model_the_same_way_in_both_modes(tmp_path):
    settings = {"num-server-rounds": 3, "eval.every-round": 2, "eval.fraction": 0.25}
    _, layer, grid, _, _ = adapter_run(tmp_path, "layerwise", **settings)
    _, whole, _, _, _ = adapter_run(tmp_path, "all_at_once", **settings)
    # Rounds 2 and 3 (every second round, and the last); 175 examples per partition, 44 held out on each node.
    assert [r.eval_loss is not None for r in layer.history] == [False, True, True]
    assert [r.eval_loss for r in layer.history] == [r.eval_loss for r in whole.history]
    assert all(r.eval_examples == 88 and r.eval_nodes == ["partition-0", "partition-1"] for r in layer.history[1:])
    types = [m.metadata.message_type for m in grid.sent]
    assert protocol.EVALUATE_RECEIVE in types and types.count(protocol.EVALUATE) == 2 * 2
    # The adapter goes down once more per evaluation, and those bytes are the round's too.
    assert layer.history[1].bytes_down > layer.history[0].bytes_down


def test_a_node_failing_to_evaluate_is_named_and_training_goes_on(tmp_path, caplog):
    _, strategy, _, _, final = adapter_run(tmp_path, "layerwise", {2: fails_on(protocol.EVALUATE)},
                                           **{"eval.every-round": 1, "eval.fraction": 0.25})  # fmt: skip
    for record in strategy.history:
        assert record.failures == {} and record.aggregated == ["partition-0", "partition-1"]  # training is untouched
        assert "CUDA out of memory" in record.eval_failures["partition-1"] and record.eval_nodes == ["partition-0"]
        assert record.eval_examples == 44 and record.eval_loss > 0
    assert "partition-1 not evaluated" in caplog.text and final.name == "round-2"


def without_seconds(strategy) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in strategy.history.as_json()]


def test_the_same_seed_repeats_every_bit_and_another_seed_does_not(tmp_path):
    settings = {"num-server-rounds": 2, "strategy.fraction-train": 0.5, "strategy.min-train-nodes": 1}
    _, first, _, _, a = adapter_run(tmp_path / "a", "layerwise", node_ids=(11, 22), **settings)
    # Other node ids, as the Simulation Engine draws them anew in every run: the names keep the order.
    _, again, _, _, b = adapter_run(tmp_path / "b", "layerwise", node_ids=(93, 4), **settings)
    assert files_of(a) == files_of(b) and without_seconds(first) == without_seconds(again)
    _, _, _, _, c = adapter_run(tmp_path / "c", "layerwise", node_ids=(11, 22), **settings, **{"train.seed": 7})
    assert (a / "adapter_model.safetensors").read_bytes() != (c / "adapter_model.safetensors").read_bytes()


def crash_in_round_3_and_resume(tmp_path, **settings):
    """A 4-round run kept every 2 rounds, the same run with every node failing in round 3 (the round fails), and
    that run resumed: (the unbroken run's history and final checkpoint, the crashed run's directory, the resumed
    run's history, grid and final checkpoint)."""
    settings = {"num-server-rounds": 4, "train.save-every-round": 2, **settings}
    _, whole, _, _, reference = adapter_run(tmp_path / "whole", "layerwise", **settings)

    def crashes_in_round_3(node):
        return lambda m: error_reply(m, "killed") if protocol.Header.from_content(m.content).server_round == 3 else node(m)

    with pytest.raises(RoundFailed):
        adapter_run(tmp_path / "crash", "layerwise", {1: crashes_in_round_3, 2: crashes_in_round_3}, run_id=8, **settings)
    crashed = tmp_path / "crash" / "runs-layerwise" / "8"
    _, resumed, grid, _, final = adapter_run(tmp_path / "crash", "layerwise", run_id=9,
                                             **settings, **{"resume-from": str(crashed)})  # fmt: skip
    return whole, reference, crashed, resumed, grid, final


def test_a_crashed_run_resumes_from_its_last_kept_round_to_the_same_bytes(tmp_path):
    whole, reference, _, resumed, grid, final = crash_in_round_3_and_resume(tmp_path)
    assert files_of(final) == files_of(reference) and without_seconds(resumed) == without_seconds(whole)
    assert min(protocol.Header.from_content(m.content).server_round for m in grid.sent) == 3  # rounds 1-2 not redone


def test_a_warm_start_begins_round_1_from_the_given_adapter(tmp_path):
    _, _, _, _, earlier = adapter_run(tmp_path / "first", "layerwise")
    _, _, grid, initial, _ = adapter_run(tmp_path / "warm", "layerwise", **{"model.init-adapter": str(earlier)})
    assert_bit_equal(initial, read(earlier))
    sent = next(m for m in grid.sent if m.metadata.message_type == protocol.TRAIN)  # round 1's global adapter
    assert protocol.TrainIns.from_content(sent.content).group is not None


# --- server optimizers and FedProx ------------------------------------------------------------------------------

OPTIMIZER_SETTINGS = {"learning_rate": 0.1, "momentum": 0.9, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_a_server_optimizer_steps_from_the_global_model_each_round_in_both_modes(tmp_path, kind):
    from testbed.reference import server_optimizer_rounds

    states, weights, base = [full_model(seed) for seed in range(3)], [4.0, 1.0, 9.0], full_model(99)
    settings = {"strategy.name": kind, "strategy.server-learning-rate": 0.1, "num-server-rounds": 3}
    _, _, layer_final, _ = full_weights_run(tmp_path, states, weights, name="layerwise", base=base, **settings)
    _, _, whole_final, _ = full_weights_run(tmp_path, states, weights, mode="all_at_once", name="whole", base=base,
                                                **settings)  # fmt: skip
    assert files_of(layer_final) == files_of(whole_final) and (layer_final / "server_optimizer").is_dir()
    # Round 1: each node sends the model it holds; later rounds, the global model it was sent (aggregation only).
    g1, _ = server_optimizer_rounds(kind, OPTIMIZER_SETTINGS, base, [states], weights)
    g2, _ = server_optimizer_rounds(kind, OPTIMIZER_SETTINGS, base, [states, [g1] * 3], weights)
    expected, state = server_optimizer_rounds(kind, OPTIMIZER_SETTINGS, base, [states, [g1] * 3, [g2] * 3], weights)
    assert_bit_equal(read(layer_final), expected)
    assert_bit_equal(read(layer_final / "server_optimizer"), state)
    assert not torch.equal(expected["head.weight"], torch_weighted_mean(states, weights)["head.weight"])


def test_a_server_optimizer_without_the_global_model_on_the_server_stops_the_run(tmp_path):
    states = [full_model(seed) for seed in range(2)]
    with pytest.raises(RoundFailed, match="strategy.name=fedadam needs the global model before the round"):
        full_weights_run(tmp_path, states, [1, 1], **{"strategy.name": "fedadam"})


def test_a_resumed_run_continues_the_server_optimizers_state_to_the_same_bytes(tmp_path):
    whole, reference, crashed, resumed, _, final = crash_in_round_3_and_resume(tmp_path, **{"strategy.name": "fedadam"})
    assert (reference / "server_optimizer").is_dir()
    assert files_of(final) == files_of(reference) and without_seconds(resumed) == without_seconds(whole)
    # Without the saved state (moments restarting at zero) round 3 would step differently.
    assert (crashed / "checkpoints" / "round-2" / "server_optimizer").is_dir()


def test_fedprox_sends_mu_each_round_and_mu_zero_is_fedavg(tmp_path):
    _, _, _, _, plain = adapter_run(tmp_path / "fedavg", "layerwise")
    _, _, grid, _, prox = adapter_run(tmp_path / "prox", "layerwise", **{"strategy.name": "fedprox",
                                                                         "strategy.proximal-mu": 5.0})  # fmt: skip
    mus = {protocol.TrainIns.from_content(m.content).proximal_mu for m in grid.sent if m.metadata.message_type == protocol.TRAIN}
    assert mus == {5.0}
    assert (prox / "adapter_model.safetensors").read_bytes() != (plain / "adapter_model.safetensors").read_bytes()
    _, _, _, _, zero = adapter_run(tmp_path / "zero", "layerwise", **{"strategy.name": "fedprox", "strategy.proximal-mu": 0.0})
    assert files_of(zero) == files_of(plain)
    assert not any(p.name == "server_optimizer" for p in plain.iterdir())


# --- compressed updates ----------------------------------------------------------------------------------------


def encodings(grid, message_type, node=None):
    """The encoding of each group of ``message_type`` sent (to ``node``), in order."""
    out = []
    for m in grid.sent:
        if m.metadata.message_type != message_type or (node is not None and m.metadata.dst_node_id != node):
            continue
        content = m.content
        if message_type == protocol.TRAIN:
            group = protocol.TrainIns.from_content(content).group
        elif message_type == protocol.EVALUATE:
            group = protocol.EvaluateIns.from_content(content).group
        else:
            group = protocol.ReceiveIns.from_content(content).group
        out.append((protocol.Header.from_content(content).server_round, group.encoding if group else None))
    return out


@pytest.mark.parametrize("update_format", ["bfloat16", "int8"])
def test_compressed_updates_rebuild_the_servers_global_model_on_every_node_bit_for_bit(tmp_path, update_format):
    from flowertune_llm.weights.codec import CHANGE_DIR
    from flowertune_llm.weights.node_state import ReceivedGroups

    settings = {"num-server-rounds": 3, "exchange.update-format": update_format}
    _, layer, grid, _, layer_final = adapter_run(tmp_path, "layerwise", **settings)
    _, _, _, _, whole_final = adapter_run(tmp_path, "all_at_once", **settings)
    assert files_of(layer_final) == files_of(whole_final) and (layer_final / CHANGE_DIR).is_dir()
    # Round 1 sends the weights; rounds 2 and 3 the change from the model each node trained from.
    trains = encodings(grid, protocol.TRAIN)
    assert {e for r, e in trains if r == 1} == {""}
    assert {(r, e) for r, e in trains if r > 1} == {(2, f"{update_format}:0"), (3, f"{update_format}:1")}
    # What each node rebuilt for round 3 is the server's round-2 checkpoint, bit for bit.
    round_2 = read(tmp_path / "runs-layerwise" / "7" / "checkpoints" / "round-2")
    for node_dir in sorted((tmp_path / "node-state").glob("node-*")):
        with ReceivedGroups(node_dir / "held") as held:
            assert_bit_equal(held.state(), round_2)
    # Less traffic both ways from round 2 on (down and up are changes; round 1 still sends the weights down).
    # This adapter is tiny: groups of a few KiB, whose headers and keys weigh, and LoRA B matrices with rows of
    # r=4 values, each its own int8 block with a 4-byte scale (0.5x alone). Recipe-sized adapters:
    # bench/results/update_formats.
    _, plain, _, _, _ = adapter_run(tmp_path / "plain", "layerwise", **{"num-server-rounds": 3})
    ratio = 0.6
    assert layer.history[1].bytes_down < ratio * plain.history[1].bytes_down
    assert all(c.bytes_up < ratio * p.bytes_up for c, p in zip(layer.history, plain.history, strict=True))
    assert all(0 < r.train_loss < 10 for r in layer.history)


def test_a_node_that_holds_the_model_gets_nothing_and_one_that_sat_out_gets_the_weights(tmp_path):
    settings = {"num-server-rounds": 4, "exchange.update-format": "int8", "eval.every-round": 1, "eval.fraction": 0.25,
                "strategy.fraction-train": 0.5, "strategy.min-train-nodes": 1}  # fmt: skip
    _, strategy, grid, _, _ = adapter_run(tmp_path, "layerwise", node_ids=(1, 2, 3), **settings)
    sampled = [set(r.aggregated) for r in strategy.history]
    names = {1: "partition-0", 2: "partition-1", 3: "partition-2"}
    for node, name in names.items():
        trains = dict(encodings(grid, protocol.TRAIN, node))
        evals = dict(encodings(grid, protocol.EVALUATE, node))
        for r, encoding in trains.items():
            if r > 1 and name in sampled[r - 2]:
                assert encoding == f"held:{r - 1}"  # it evaluated last round's model: nothing moves
            else:
                assert encoding == ""  # it sat out: the weights
        for r, encoding in evals.items():
            assert encoding == f"int8:{r - 1}"  # it trained from the model before this one
    # Held nodes get no group messages at all for that round.
    held_rounds = {(node, r) for node in names for r, e in encodings(grid, protocol.TRAIN, node) if e.startswith("held")}
    assert held_rounds
    assert not {(m.metadata.dst_node_id, r) for m in grid.sent if m.metadata.message_type == protocol.RECEIVE
                for r in [protocol.Header.from_content(m.content).server_round]} & held_rounds  # fmt: skip


def test_a_node_that_lost_its_copy_is_left_out_once_and_then_gets_the_weights(tmp_path):
    import shutil

    def forgets_before_round_3(node):
        def behave(message):
            if message.metadata.message_type == protocol.TRAIN and protocol.Header.from_content(message.content).server_round == 3:
                shutil.rmtree(tmp_path / "node-state" / "node-2" / "held")  # a restarted node, say
            return node(message)
        return behave

    settings = {"num-server-rounds": 4, "exchange.update-format": "int8", "strategy.min-train-nodes": 1}
    _, strategy, grid, _, _ = adapter_run(tmp_path, "layerwise", {2: forgets_before_round_3}, **settings)
    assert "holds no global model" in strategy.history[2].failures["partition-1"]
    assert strategy.history[3].aggregated == ["partition-0", "partition-1"]
    assert dict(encodings(grid, protocol.TRAIN, 2))[4] == ""


def test_compressed_updates_are_refused_for_full_model_runs():
    from flowertune_llm.config import ConfigError

    with pytest.raises(ConfigError, match="exchange.update-format"):
        make_config(**{"exchange.update-format": "int8", "train.training-arguments.max-steps": 0})
