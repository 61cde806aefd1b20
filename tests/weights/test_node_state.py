"""A node's weights between the messages of a round, on its own disk: received, trained, served back."""

from __future__ import annotations

import pytest
import torch

from flowertune_llm.weights.groups import plan_groups
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.node_state import EVAL, NodeState, ReceivedGroups
from flowertune_llm.weights.tensors import specs_of

from conftest import assert_bit_equal, model_state, pieces_of


def receive_all(node: NodeState, server_round: int, state, budget: int = 300) -> list:
    groups = plan_groups(specs_of(state), budget)
    for index, group in enumerate(groups):
        manifest = specs_of(state) if index == 0 else None
        node.receive(server_round, index, len(groups), pieces_of(state, group), manifest)
    return groups


def test_the_received_groups_rebuild_the_global_model_and_serve_any_piece(tmp_path):
    state = model_state(torch.bfloat16)
    node = NodeState.open(run_id=1, node_id=5, state_dir=tmp_path)
    node.begin_round(1)
    groups = receive_all(node, 1, state)
    assert any(p.rows for g in groups for p in g)  # the embedding came in row ranges
    received = node.received(1)
    assert isinstance(received, ReceivedGroups) and received.specs == specs_of(state)
    with received:
        assert_bit_equal(received.state(), state)
        keys = [p.key for p in groups[1]]
        assert_bit_equal(received.group(keys), pieces_of(state, groups[1]))
        with pytest.raises(KeyError, match="not among the groups this node received"):
            received.group(["model.norm.weight[0:3]"])


def test_a_round_missing_groups_is_refused_and_a_round_without_any_is_none(tmp_path):
    state = model_state(torch.float16)
    node = NodeState.open(1, 5, tmp_path)
    node.begin_round(2)
    assert node.received(2) is None  # an aggregation-only run's first round: nothing was sent
    groups = plan_groups(specs_of(state), 300)
    node.receive(2, 0, len(groups), pieces_of(state, groups[0]), specs_of(state))
    with pytest.raises(RuntimeError, match=f"received 1 of {len(groups)} groups of round 2"):
        node.received(2)


def test_the_update_is_served_by_key_after_training(tmp_path):
    trained = model_state(torch.float32, seed=3)
    node = NodeState.open(1, 5, tmp_path)
    node.begin_round(1)
    with pytest.raises(RuntimeError, match="asked for weights before the train message"):
        node.source(1)
    node.serve_from(1, node.save_update(1, trained))
    with node.source(1) as source:
        assert isinstance(source, LocalCheckpoint) and source.specs == specs_of(trained)
        assert_bit_equal(source.group(["lm_head.weight[0:5]"]), {"lm_head.weight[0:5]": trained["lm_head.weight"][:5]})


def test_a_new_round_drops_the_last_and_a_new_run_drops_everything(tmp_path):
    state = model_state(torch.bfloat16)
    node = NodeState.open(1, 5, tmp_path)
    node.begin_round(1)
    receive_all(node, 1, state)
    node.begin_round(2)
    assert [p.name for p in node.root.glob("round-*")] == ["round-2"]  # round 1's model is gone from disk
    receive_all(node, 2, state)
    again = NodeState.open(1, 5, tmp_path)  # the same run: its files stay
    assert again.received(2) is not None
    fresh = NodeState.open(2, 5, tmp_path)  # another run: an old model's worth of files must not linger
    assert list(fresh.root.glob("round-*")) == [] and (fresh.root / "run").read_text() == "2"


def test_a_node_short_of_disk_refuses_the_model_before_storing_any_of_it(tmp_path, monkeypatch):
    from flowertune_llm.weights import disk

    real = disk.shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: real(path)._replace(free=10))
    state = model_state(torch.bfloat16)
    node = NodeState.open(1, 5, tmp_path)
    node.begin_round(1)
    with pytest.raises(OSError, match="not enough disk space for the global model this node receives"):
        receive_all(node, 1, state)
    assert not list((node.root / "round-1").rglob("*.safetensors"))


def test_evaluating_a_rounds_result_keeps_it_apart_from_that_rounds_training(tmp_path):
    trained_on, to_evaluate = model_state(torch.bfloat16, seed=1), model_state(torch.bfloat16, seed=2)
    node = NodeState.open(1, 5, tmp_path)
    node.begin_round(3)
    receive_all(node, 3, trained_on)
    groups = plan_groups(specs_of(to_evaluate), 300)
    node.begin_round(3, EVAL)  # round 3's training is over: its files go, the new global model comes
    for index, group in enumerate(groups):
        node.receive(3, index, len(groups), pieces_of(to_evaluate, group), specs_of(to_evaluate) if index == 0 else None, EVAL)
    assert node.received(3) is None and [p.name for p in node.root.glob("*-3")] == ["eval-3"]
    with node.received(3, EVAL) as received:
        assert_bit_equal(received.state(), to_evaluate)
