"""The messages of a round: each survives Flower's transport intact, and content that is not it is named."""

from __future__ import annotations

import pickle

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from flowertune_llm.federated import protocol
from flowertune_llm.weights.tensors import specs_of
from flowertune_llm.weights.transport import from_record, to_record

from conftest import assert_bit_equal, model_state

STATE = model_state(torch.bfloat16)
ARRAYS = to_record(STATE)


def through_flower(content: RecordDict, message_type: str) -> RecordDict:
    """A content as a node receives it: in a Flower message, pickled as the Simulation Engine moves it."""
    return pickle.loads(pickle.dumps(Message(content, dst_node_id=1, message_type=message_type))).content


def test_a_group_going_down_keeps_its_place_its_manifest_and_its_tensors():
    ins = protocol.ReceiveIns(protocol.Header(3, profile=True), protocol.Group(0, 5, ARRAYS, specs_of(STATE)))
    got = protocol.ReceiveIns.from_content(through_flower(ins.to_content(), protocol.RECEIVE))
    assert got.header == protocol.Header(3, True)
    assert (got.group.index, got.group.count, got.group.manifest) == (0, 5, specs_of(STATE))
    assert_bit_equal(from_record(got.group.arrays), STATE)
    later = protocol.ReceiveIns(protocol.Header(3), protocol.Group(2, 5, ARRAYS))
    assert protocol.ReceiveIns.from_content(later.to_content()).group.manifest is None  # only the first carries it


def test_the_train_instruction_with_and_without_the_last_group():
    with_group = protocol.TrainIns(protocol.Header(4), 2.5e-4, ["a", "b[0:3]"], protocol.Group(6, 7, ARRAYS))
    got = protocol.TrainIns.from_content(through_flower(with_group.to_content(), protocol.TRAIN))
    assert (got.header.server_round, got.learning_rate, got.reply_keys) == (4, 2.5e-4, ["a", "b[0:3]"])
    assert (got.group.index, got.group.count) == (6, 7)
    # An aggregation-only run's first round: the nodes hold the model, nothing rides along.
    bare = protocol.TrainIns(protocol.Header(1), 0.0, ["a"])
    assert protocol.TrainIns.from_content(bare.to_content()).group is None
    assert protocol.arrays_of(bare.to_content()) is None


@pytest.mark.parametrize("loss", [1.25, None])
def test_the_train_reply_carries_the_update_its_manifest_weight_and_loss(loss):
    reply = protocol.TrainRes(ARRAYS, specs_of(STATE), weight=175, train_loss=loss, step_seconds=None if loss is None else 0.5)
    got = protocol.TrainRes.from_content(through_flower(reply.to_content(), protocol.TRAIN))
    assert (got.manifest, got.weight, got.train_loss) == (specs_of(STATE), 175.0, loss)
    assert got.step_seconds == (None if loss is None else 0.5)
    assert protocol.arrays_of(reply.to_content()).count_bytes() == ARRAYS.count_bytes()  # what the server bills


def test_send_asks_for_keys_and_its_reply_carries_them():
    ins = protocol.SendIns(protocol.Header(9, profile=True), ["model.norm.weight", "lm_head.weight[0:8]"])
    got = protocol.SendIns.from_content(through_flower(ins.to_content(), protocol.SEND))
    assert got == ins
    assert protocol.SendRes.from_content(protocol.SendRes(ARRAYS).to_content()).arrays is ARRAYS


def test_evaluation_brings_the_last_group_and_returns_a_loss_over_examples():
    ins = protocol.EvaluateIns(protocol.Header(6), protocol.Group(2, 3, ARRAYS))
    got = protocol.EvaluateIns.from_content(through_flower(ins.to_content(), protocol.EVALUATE))
    assert got.header.server_round == 6 and (got.group.index, got.group.count) == (2, 3)
    reply = protocol.EvaluateRes.from_content(through_flower(protocol.EvaluateRes(2.75, 47).to_content(), protocol.EVALUATE))
    assert reply == protocol.EvaluateRes(2.75, 47) and protocol.arrays_of(protocol.EvaluateRes(1.0, 1).to_content()) is None


def test_every_instruction_says_its_round_and_whether_to_profile():
    for ins in (protocol.ReceiveIns(protocol.Header(5, True), protocol.Group(1, 2, ARRAYS)),
                protocol.TrainIns(protocol.Header(5, True), 1e-3, []), protocol.SendIns(protocol.Header(5, True), [])):  # fmt: skip
        assert protocol.Header.from_content(ins.to_content()) == protocol.Header(5, True)


def test_profile_events_ride_back_in_the_reply():
    content = protocol.Ack().to_content()
    assert protocol.events_of(content) == []
    events = [{"kind": "span", "name": "train", "seconds": 1.5}]
    protocol.attach_events(content, events)
    assert protocol.events_of(through_flower(content, protocol.RECEIVE)) == events


@pytest.mark.parametrize(
    "content, read, missing",
    [
        (RecordDict(), protocol.TrainRes.from_content, "lacks the 'metrics' record (it has: none)"),
        (protocol.SendRes(ARRAYS).to_content(), protocol.TrainRes.from_content, "lacks the 'metrics' record"),
        (RecordDict({"config": ConfigRecord({"server-round": 1})}), protocol.SendIns.from_content, "lacks 'keys'"),
        (RecordDict({"config": ConfigRecord({"keys": ["a"]})}), protocol.SendIns.from_content, "lacks 'server-round'"),
        (protocol.TrainIns(protocol.Header(1), 1e-3, []).to_content(), protocol.SendRes.from_content, "'arrays'"),
    ],
)
def test_content_that_is_not_the_message_names_what_it_lacks(content, read, missing):
    with pytest.raises(protocol.ProtocolError, match=missing.replace("(", r"\(").replace(")", r"\)")):
        read(content)


def test_importing_the_protocol_costs_no_torch():
    # A deployment ClientApp is a new process per message: it reads the header and hands the content on.
    import subprocess
    import sys

    code = "import sys, flowertune_llm.federated.protocol, flowertune_llm.client_app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
