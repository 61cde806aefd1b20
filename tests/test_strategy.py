"""The server's round loop against an in-process grid whose nodes misbehave on purpose.

The grid below stands in for Flower's so that an error reply, a malformed update or a node that never
answers can be produced deterministically; the real engine runs in test_simulation.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from flowertune_llm.checkpoint import RunDirectory
from flowertune_llm.models import lora_config
from flowertune_llm.strategy import AdapterFedAvg, RoundFailed, from_array_record, to_array_record

from conftest import make_config

Behaviour = Callable[[Message], Message | None]  # None: the node never answers


class ScriptedGrid(Grid):
    def __init__(self, behaviours: dict[int, Behaviour]):
        self.behaviours = behaviours
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

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
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        raise NotImplementedError


def trains_to(value: float, num_examples: int, loss: float = 1.0) -> Behaviour:
    """A node whose update sets every adapter entry to ``value``."""

    def reply(message: Message) -> Message:
        state = {k: np.full_like(v, value) for k, v in from_array_record(message.content["arrays"]).items()}
        metrics = MetricRecord({"train_loss": loss, "num-examples": num_examples})
        return Message(RecordDict({"arrays": to_array_record(state), "metrics": metrics}), reply_to=message)

    return reply


def fails(message: Message) -> Message:
    return Message(Error(code=0, reason="CUDA out of memory"), reply_to=message)


def never_answers(message: Message) -> None:
    return None


def sends_nan(message: Message) -> Message:
    reply = trains_to(0.0, 10)(message)
    arrays = from_array_record(reply.content["arrays"])
    first = next(iter(arrays))
    arrays[first] = np.full_like(arrays[first], np.nan)
    reply.content["arrays"] = to_array_record(arrays)
    return reply


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    # Messages stamp the sending task's identity, which Flower sets when it starts a ServerApp.
    for name, value in {"_run_id": 7, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


INITIAL = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 128), np.float32),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((128, 4), np.float32),
}


def run_strategy(tmp_path, behaviours, **overrides):
    settings = {"num-server-rounds": 2, "train.save-every-round": 1, "strategy.fraction-train": 1.0}
    settings.update(overrides)
    config = make_config(**settings)
    run_dir = RunDirectory.create(tmp_path, 7, {})
    strategy = AdapterFedAvg(config, run_dir, lora_config(config.model))
    grid = ScriptedGrid(behaviours)
    final = strategy.run(grid, INITIAL)
    return strategy, grid, final, run_dir


def test_fedavg_weights_by_num_examples_and_counts_bytes(tmp_path):
    strategy, grid, final, run_dir = run_strategy(
        tmp_path, {1: trains_to(1.0, 10, loss=2.0), 2: trains_to(4.0, 30, loss=4.0)}
    )
    for value in final.values():
        np.testing.assert_allclose(value, 3.25)  # (1*10 + 4*30) / 40
    first = strategy.history[0]
    assert first.train_loss == pytest.approx(3.5)  # (2*10 + 4*30) / 40
    assert sorted(first.aggregated) == [1, 2] and first.failures == {}
    payload = to_array_record(INITIAL).count_bytes()
    assert all(r.bytes_down == 2 * payload and r.bytes_up == 2 * payload for r in strategy.history)
    assert strategy.total_bytes == 8 * payload

    sent_config = grid.sent[0].content["config"]
    assert sent_config["server-round"] == 1 and sent_config["learning-rate"] == pytest.approx(
        strategy.config.train.learning_rate_max
    )
    assert grid.sent[-1].content["config"]["learning-rate"] == pytest.approx(strategy.config.train.learning_rate_min)

    history = json.loads((run_dir.path / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    assert (run_dir.path / "loss.png").stat().st_size > 0
    saved = load_file(str(run_dir.checkpoint_dir(2) / "adapter_model.safetensors"))
    assert saved.keys() == INITIAL.keys()
    np.testing.assert_allclose(next(iter(saved.values())), 3.25)


def test_failed_malformed_and_silent_nodes_are_named_and_left_out(tmp_path, caplog):
    behaviours = {
        1: trains_to(1.0, 10),
        2: trains_to(3.0, 10),
        3: fails,
        4: never_answers,
        5: sends_nan,
    }
    strategy, _, final, _ = run_strategy(tmp_path, behaviours, **{"strategy.round-timeout": 0.5})
    for value in final.values():
        np.testing.assert_allclose(value, 2.0)
    record = strategy.history[0]
    assert sorted(record.aggregated) == [1, 2]
    assert "CUDA out of memory" in record.failures["3"]
    assert "no reply within strategy.round-timeout=0.5s" in record.failures["4"]
    assert "NaN or Inf" in record.failures["5"]
    logged = caplog.text
    assert "node 3 left out" in logged and "node 4 left out" in logged and "node 5 left out" in logged


def test_too_few_usable_updates_stop_the_run(tmp_path):
    with pytest.raises(RoundFailed, match="1 usable update\\(s\\), fewer than strategy.min-train-nodes=2"):
        run_strategy(tmp_path, {1: trains_to(1.0, 10), 2: fails})


def test_sampling_takes_the_fraction_but_at_least_the_minimum(tmp_path):
    behaviours = {node: trains_to(1.0, 10) for node in range(1, 21)}
    strategy, grid, _, _ = run_strategy(
        tmp_path, behaviours, **{"strategy.fraction-train": 0.25, "strategy.min-train-nodes": 2}
    )
    assert [len(r.nodes) for r in strategy.history] == [5, 5]
    strategy, _, _, _ = run_strategy(
        tmp_path, behaviours, **{"strategy.fraction-train": 0.05, "strategy.min-train-nodes": 3}
    )
    assert [len(r.nodes) for r in strategy.history] == [3, 3]


def test_checkpoints_every_n_rounds_and_after_the_last(tmp_path):
    _, _, _, run_dir = run_strategy(
        tmp_path,
        {1: trains_to(1.0, 10), 2: trains_to(1.0, 10)},
        **{"num-server-rounds": 5, "train.save-every-round": 2},
    )
    saved = sorted(p.name for p in (run_dir.path / "checkpoints").iterdir())
    assert saved == ["round-2", "round-4", "round-5"]
