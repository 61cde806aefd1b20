"""A node's side of a round, message by message: store the model, train (or hold), send the update back."""

from __future__ import annotations

import pytest
import torch

from flowertune_llm.config import ConfigError, NodeConfig, NodeConfigError, to_flat_dict
from flowertune_llm.federated import client_round, protocol
from flowertune_llm.observe.profiling import OFF
from flowertune_llm.weights.groups import plan_groups
from flowertune_llm.weights.shards import save_local_checkpoint
from flowertune_llm.weights.tensors import specs_of
from flowertune_llm.weights.transport import from_record, to_record

from conftest import assert_bit_equal, make_config, model_state, pieces_of

HOLD = {"train.training-arguments.max-steps": 0, "model.quantization": 0}


def node_round(tmp_path, node_config: dict, **overrides) -> client_round.NodeRound:
    node = NodeConfig.parse({"state-dir": str(tmp_path / "state"), **node_config})
    return client_round.NodeRound(1, 3, make_config(**overrides), node)


def answer(ins, message_type: str, round_: client_round.NodeRound):
    return client_round.handle(message_type, ins.to_content(), round_, OFF)


def test_a_node_holding_the_model_answers_with_its_own_weights_and_weight(tmp_path):
    state = model_state(torch.bfloat16)
    model = save_local_checkpoint(state, tmp_path / "model")
    round_ = node_round(tmp_path, {"model-path": str(model), "aggregation-weight": 2.5}, **HOLD)
    groups = plan_groups(specs_of(state), 300)
    reply = protocol.TrainRes.from_content(answer(protocol.TrainIns(protocol.Header(1), 0.0, [p.key for p in groups[0]]), protocol.TRAIN, round_))
    assert reply.weight == 2.5 and reply.train_loss is None and reply.manifest == specs_of(state)
    assert_bit_equal(from_record(reply.arrays), pieces_of(state, groups[0]))
    sent = protocol.SendRes.from_content(answer(protocol.SendIns(protocol.Header(1), [p.key for p in groups[2]]), protocol.SEND, round_))
    assert_bit_equal(from_record(sent.arrays), pieces_of(state, groups[2]))


def test_the_global_model_comes_down_in_groups_and_is_served_back_whole(tmp_path):
    state = model_state(torch.float16, seed=4)
    round_ = node_round(tmp_path, {"model-path": str(tmp_path / "unused")}, **HOLD)
    groups = plan_groups(specs_of(state), 300)
    for index, group in enumerate(groups[:-1]):
        down = protocol.ReceiveIns(protocol.Header(2), protocol.Group(index, len(groups), to_record(pieces_of(state, group)),
                                                                      specs_of(state) if index == 0 else None))  # fmt: skip
        assert answer(down, protocol.RECEIVE, round_) == protocol.Ack().to_content()
    last = protocol.Group(len(groups) - 1, len(groups), to_record(pieces_of(state, groups[-1])))
    train = protocol.TrainIns(protocol.Header(2), 0.0, [p.key for p in groups[0]], last)
    reply = protocol.TrainRes.from_content(answer(train, protocol.TRAIN, round_))
    assert reply.weight == 1.0  # the default aggregation-weight
    assert_bit_equal(from_record(reply.arrays), pieces_of(state, groups[0]))  # what it received, not its own copy


def test_a_training_node_without_the_global_adapter_says_so(tmp_path):
    round_ = node_round(tmp_path, {"partition-id": 0, "num-partitions": 2})
    with pytest.raises(ValueError, match="round 1: the train message came without the global adapter"):
        answer(protocol.TrainIns(protocol.Header(1), 1e-3, []), protocol.TRAIN, round_)


def test_a_missing_model_path_is_named(tmp_path):
    round_ = node_round(tmp_path, {"model-path": str(tmp_path / "nowhere")}, **HOLD)
    with pytest.raises(NodeConfigError, match=f"model-path='{tmp_path / 'nowhere'}': no such directory"):
        answer(protocol.TrainIns(protocol.Header(1), 0.0, []), protocol.TRAIN, round_)


def test_the_run_config_is_parsed_once_per_run_from_the_context(tmp_path):
    from flwr.app import Context, RecordDict

    flat = to_flat_dict(make_config())
    context = Context(run_id=5, node_id=3, node_config={}, state=RecordDict(), run_config=flat)
    first = client_round.NodeRound.of(context, NodeConfig())
    assert client_round.NodeRound.of(context, NodeConfig()).run is first.run
    with pytest.raises(ConfigError, match="model.quantization"):
        client_round.NodeRound.of(Context(run_id=6, node_id=3, node_config={}, state=RecordDict(),
                                          run_config={**flat, "model.quantization": 3}), NodeConfig())  # fmt: skip
