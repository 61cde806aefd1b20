"""The server's round loop against an in-process grid whose nodes run the real client handlers.

The grid below stands in for Flower's so that an error reply, a malformed update or a node that never
answers can be produced deterministically; the real engines run in test_simulation.py and test_deployment.py.
Nodes here hold known weights (aggregation-only runs of small full models, each node its own checkpoint),
so every average can be checked against a hand computation, bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from uuid import uuid4

import pytest
import torch
from flwr.app import Error, Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from flowertune_llm import client_round, models, shards
from flowertune_llm.checkpoint import RunDirectory
from flowertune_llm.config import to_flat_dict
from flowertune_llm.exchange import RECEIVE, SEND, TRAIN, Exchange
from flowertune_llm.profiling import OFF
from flowertune_llm.shards import InsufficientDiskSpaceError, LocalCheckpoint, save_local_checkpoint
from flowertune_llm.strategy import RoundFailed, StreamingFedAvg
from flowertune_llm.streaming import weighted_mean
from flowertune_llm.transport import specs_of, to_record

from conftest import make_config

Behaviour = Callable[[Message], Message | None]  # None: the node never answers


class ScriptedGrid(Grid):
    def __init__(self, behaviours: dict[int, Behaviour]):
        self.behaviours = behaviours
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}
        self.asked: set[str] = set()  # every message id the server has pulled (waited) for
        self.most_waiting: dict[str, int] = {}  # message type -> most replies of that type waiting to be pulled

    def set_run(self, run):  # pragma: no cover - not used by the strategy
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.behaviours)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(message)
            reply = self.behaviours[message.metadata.dst_node_id](message)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
            kind = message.metadata.message_type
            waiting = sum(r.metadata.message_type == kind for r in self._replies.values())
            self.most_waiting[kind] = max(self.most_waiting.get(kind, 0), waiting)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        self.asked.update(message_ids)
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        raise NotImplementedError


class Node:
    """A node running the real client handlers in this process, with its own state directory."""

    def __init__(self, config, node_id: int, node_config: dict):
        self.run_config, self.node_id, self.node_config = to_flat_dict(config), node_id, node_config
        self.seen: list[str] = []

    def __call__(self, message: Message) -> Message | None:
        self.seen.append(message.metadata.message_type)
        content = client_round.handle(
            message.metadata.message_type, message.content, self.run_config, self.node_config, 7, self.node_id, OFF
        )
        return Message(content, reply_to=message)


Misbehaviour = Callable[[Node], Behaviour]  # what a node does instead of (or around) the real handlers


def fails_on(message_type: str) -> Misbehaviour:
    def wrap(node: Node) -> Behaviour:
        def reply(message: Message) -> Message | None:
            if message.metadata.message_type == message_type:
                return Message(Error(code=0, reason="CUDA out of memory"), reply_to=message)
            return node(message)

        return reply

    return wrap


def silent(node: Node) -> Behaviour:
    return lambda message: None


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    # Messages stamp the sending task's identity, which Flower sets when it starts a ServerApp.
    for name, value in {"_run_id": 7, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


def model_state(seed: int, dtype=torch.bfloat16, fill: float | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (64, 16), "layers.0.proj.weight": (32, 16), "layers.0.norm.weight": (16,),
              "layers.1.proj.weight": (32, 16), "head.weight": (64, 16)}  # fmt: skip
    return {
        name: (torch.full(shape, fill) if fill is not None else torch.randn(shape, generator=generator)).to(dtype)
        for name, shape in shapes.items()
    }


def full_weights_run(tmp_path, states, weights, behaviours=None, mode="layerwise", name="run", **overrides):
    """An aggregation-only run of a small full model: node k holds ``states[k]`` with FedAvg weight ``weights[k]``."""
    settings = {"num-server-rounds": 2, "train.save-every-round": 1, "strategy.fraction-train": 1.0,
                "train.training-arguments.max-steps": 0, "aggregation.mode": mode,
                "aggregation.max-message-mb": 1.5 / 1024}  # 1.5 KiB: several groups, and the embedding split  # fmt: skip
    settings.update(overrides)
    config = make_config(**settings)
    nodes = {}
    for k, (state, weight) in enumerate(zip(states, weights), start=1):
        model_dir = save_local_checkpoint(state, tmp_path / "models" / f"node-{k}")
        node_config = {"model-path": str(model_dir), "aggregation-weight": weight, "state-dir": str(tmp_path / "nodes")}
        nodes[k] = Node(config, k, node_config)
    exchange = Exchange.for_full_model(config, specs_of(states[0]), {"config.json": b"{}"})
    run_dir = RunDirectory.create(tmp_path / name, 7, {})
    strategy = StreamingFedAvg(config, run_dir, exchange)
    grid = ScriptedGrid({k: (behaviours or {}).get(k, lambda n: n)(node) for k, node in nodes.items()})
    final = strategy.run(grid, None)
    return strategy, grid, final, run_dir


def read(checkpoint) -> dict[str, torch.Tensor]:
    with LocalCheckpoint(checkpoint) as loaded:
        return {name: loaded.tensor(name).clone() for name in loaded.specs}


def assert_bit_equal(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name].view(torch.uint8), expected[name].view(torch.uint8)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layerwise_equals_all_at_once_and_the_exact_weighted_mean(tmp_path, dtype):
    states = [model_state(seed, dtype) for seed in range(3)]
    weights = [4.0, 1.0, 9.0]
    layer, grid, layer_final, _ = full_weights_run(tmp_path, states, weights, name="layerwise")
    whole, _, whole_final, _ = full_weights_run(tmp_path, states, weights, mode="all_at_once", name="whole")
    assert layer.history[0].groups > 3 and whole.history[0].groups == 1
    expected = weighted_mean(states, weights)
    assert_bit_equal(read(layer_final), expected)
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(layer_final) == files(whole_final)
    # Round 1 sends nothing down (the nodes hold the model); round 2 sends the mean down group by group.
    first, second = layer.history
    assert first.bytes_down == 0 and second.bytes_down == first.bytes_up > 0
    assert grid.sent[0].metadata.message_type == TRAIN
    assert {m.metadata.message_type for m in grid.sent} == {TRAIN, SEND, RECEIVE}
    assert first.aggregated == [1, 2, 3] and first.failures == {}


@pytest.mark.parametrize("window", [1, 3])
def test_group_messages_go_a_window_ahead_and_change_no_bit(tmp_path, window):
    states = [model_state(seed) for seed in range(3)]
    strategy, grid, final, _ = full_weights_run(tmp_path, states, [2, 1, 1], **{"aggregation.window": window})
    assert strategy.history[0].groups > window + 1
    # Replies wait in the grid (the SuperLink) for the server to pull them group by group: a window per node.
    assert grid.most_waiting[RECEIVE] == grid.most_waiting[SEND] == 3 * window
    assert_bit_equal(read(final), weighted_mean(states, [2, 1, 1]))


def test_a_node_silent_within_the_window_is_waited_for_once(tmp_path):
    def silent_after_the_first_group_down(node: Node) -> Behaviour:
        return lambda m: None if m.metadata.message_type == RECEIVE and m.content["config"]["group"] > 0 else node(m)

    states = [model_state(seed) for seed in range(3)]
    strategy, grid, final, _ = full_weights_run(
        tmp_path, states, [1, 1, 1], {3: silent_after_the_first_group_down},
        **{"aggregation.window": 3, "strategy.round-timeout": 0.3},
    )  # fmt: skip
    assert "group 2 down: no reply" in strategy.history[1].failures["3"]
    to_node_3 = [m for m in grid.sent if m.metadata.dst_node_id == 3 and m.metadata.message_type == RECEIVE]
    assert [m.content["config"]["group"] for m in to_node_3] == [0, 1, 2, 3]  # group 1 alone, then 3 in flight
    assert [m.metadata.message_id in grid.asked for m in to_node_3] == [True, True, False, False]
    # Round 2 averages the round-1 mean of all three, which nodes 1 and 2 received whole.
    assert strategy.history[1].aggregated == [1, 2]
    assert_bit_equal(read(final), weighted_mean(states, [1, 1, 1]))


def test_bytes_are_counted_per_message_each_way(tmp_path):
    states = [model_state(seed) for seed in range(2)]
    strategy, grid, _, _ = full_weights_run(tmp_path, states, [1, 1])
    down = sum(m.content["arrays"].count_bytes() for m in grid.sent if "arrays" in m.content)
    assert sum(r.bytes_down for r in strategy.history) == down
    payload = to_record(states[0]).count_bytes()  # the pieces' keys and headers differ from the whole tensors'
    assert strategy.history[0].bytes_up == pytest.approx(2 * payload, rel=0.2)
    assert strategy.total_bytes == sum(r.bytes_down + r.bytes_up for r in strategy.history)


def test_failed_malformed_and_silent_nodes_are_named_and_left_out(tmp_path, caplog):
    states = [model_state(seed) for seed in range(6)]
    # Node k holds states[k - 1].
    states[4] = {**states[4], "head.weight": torch.zeros(64, 8, dtype=torch.bfloat16)}
    states[5] = {**states[5], "layers.1.proj.weight": torch.full((32, 16), math.nan, dtype=torch.bfloat16)}
    behaviours = {3: fails_on(TRAIN), 4: silent}
    strategy, _, final, _ = full_weights_run(
        tmp_path, states, [1] * 6, behaviours, **{"num-server-rounds": 1, "strategy.round-timeout": 0.5}
    )
    record = strategy.history[0]
    assert record.aggregated == [1, 2]
    assert "CUDA out of memory" in record.failures["3"]
    assert "no reply within strategy.round-timeout=0.5s" in record.failures["4"]
    assert "head.weight is bfloat16[64, 8], expected bfloat16[64, 16]" in record.failures["5"]
    assert "layers.1.proj.weight" in record.failures["6"] and "NaN or Inf" in record.failures["6"]
    assert record.restarts == 1  # node 6 failed after its first group was folded
    assert_bit_equal(read(final), weighted_mean(states[:2], [1, 1]))
    for node in (3, 4, 5, 6):
        assert f"node {node} left out" in caplog.text


def test_a_node_failing_while_the_model_goes_down_is_left_out_before_training(tmp_path):
    states = [model_state(seed) for seed in range(3)]
    strategy, grid, final, _ = full_weights_run(tmp_path, states, [1, 1, 1], {3: fails_on(RECEIVE)})
    assert "group 1 down" in strategy.history[1].failures["3"]
    assert strategy.history[1].aggregated == [1, 2]


def test_too_few_usable_updates_stop_the_run_and_leave_no_checkpoint(tmp_path):
    states = [model_state(seed) for seed in range(2)]
    with pytest.raises(RoundFailed, match="1 usable update\\(s\\), fewer than strategy.min-train-nodes=2"):
        full_weights_run(tmp_path, states, [1, 1], {2: fails_on(TRAIN)})
    assert not list((tmp_path / "run").rglob("*.safetensors"))


def test_not_enough_disk_is_reported_before_anything_is_sent(tmp_path, monkeypatch):
    states = [model_state(seed) for seed in range(2)]
    real = shards.shutil.disk_usage
    # Only the server's output directory is short of space.
    monkeypatch.setattr(
        shards.shutil, "disk_usage",
        lambda path: real(path)._replace(free=1000) if (tmp_path / "run") in (Path(path), *Path(path).parents) else real(path),
    )  # fmt: skip
    grids = []
    monkeypatch.setattr(ScriptedGrid, "push_messages", lambda self, m: grids.append(m) or [])
    with pytest.raises(InsufficientDiskSpaceError, match="round-1 checkpoint"):
        full_weights_run(tmp_path, states, [1, 1])
    assert grids == []


def test_sampling_takes_the_fraction_but_at_least_the_minimum(tmp_path):
    states = [model_state(seed) for seed in range(20)]
    strategy, _, _, _ = full_weights_run(
        tmp_path, states, [1] * 20, **{"strategy.fraction-train": 0.25, "strategy.min-train-nodes": 2}
    )
    assert [len(r.nodes) for r in strategy.history] == [5, 5]


def test_checkpoints_every_n_rounds_and_after_the_last(tmp_path):
    states = [model_state(seed) for seed in range(2)]
    _, _, final, run_dir = full_weights_run(
        tmp_path, states, [1, 1], **{"num-server-rounds": 5, "train.save-every-round": 2}
    )
    saved = sorted(p.name for p in (run_dir.path / "checkpoints").iterdir())
    assert saved == ["round-2", "round-4", "round-5"] and final.name == "round-5"
    history = json.loads((run_dir.path / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5] and all(r["train_loss"] is None for r in history)


def adapter_run(tmp_path, mode):
    config = make_config(**{"num-server-rounds": 2, "train.save-every-round": 1, "strategy.fraction-train": 1.0,
                            "aggregation.mode": mode, "aggregation.max-message-mb": 2 / 1024})  # fmt: skip
    torch.manual_seed(0)  # the initial adapter (LoRA A is random)
    state = models.get_adapter_state(models.build_peft_model(config.model))
    exchange = Exchange.for_adapter(config, specs_of(state), models.lora_config(config.model))
    run_dir = RunDirectory.create(tmp_path / mode, 7, {})
    nodes = {k: Node(config, k, {"partition-id": k - 1, "num-partitions": 4, "state-dir": str(tmp_path / mode)})
             for k in (1, 2)}  # fmt: skip
    grid = ScriptedGrid(nodes)
    strategy = StreamingFedAvg(config, run_dir, exchange)
    final = strategy.run(grid, exchange.write(run_dir.checkpoint_dir(0), state))
    return config, strategy, grid, state, final


def test_adapter_rounds_train_and_both_modes_write_the_same_peft_adapter(tmp_path):
    config, layer, grid, state, layer_final = adapter_run(tmp_path, "layerwise")
    _, whole, _, _, whole_final = adapter_run(tmp_path, "all_at_once")
    assert layer.history[0].groups > 1 and whole.history[0].groups == 1
    assert sorted(p.name for p in layer_final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(r.train_loss > 0 and r.aggregated == [1, 2] for r in layer.history)
    assert [r.train_loss for r in layer.history] == [r.train_loss for r in whole.history]
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(layer_final) == files(whole_final)
    lr = [m.content["config"]["learning-rate"] for m in grid.sent if m.metadata.message_type == TRAIN]
    assert lr[0] == pytest.approx(config.train.learning_rate_max)
    assert lr[-1] == pytest.approx(config.train.learning_rate_min)
    trained = read(layer_final)
    assert trained.keys() == state.keys() and any(not torch.equal(trained[k], state[k]) for k in state)
    assert not layer_final.with_name("round-0").exists()  # the initial adapter was scratch
