"""Nodes named so that runs repeat: by partition, else by id, asked once per node and run."""

from __future__ import annotations

from flwr.app import Message

from flowertune_llm.federated import protocol
from flowertune_llm.federated.messaging import Messenger
from flowertune_llm.federated.roster import Roster
from flowertune_llm.observe.profiling import OFF
from testbed.grids import ScriptedGrid


class Bill:
    round, bytes_down, bytes_up = 1, 0, 0


def answers_with(name: str):
    def reply(message: Message) -> Message:
        assert message.metadata.message_type == protocol.QUERY
        return Message(protocol.QueryRes(name).to_content(), reply_to=message)

    return reply


def test_nodes_are_named_once_and_ordered_by_name_whatever_their_ids():
    grid = ScriptedGrid({9001: answers_with("partition-1"), 17: answers_with("partition-0"), 5: lambda m: None,
                         42: answers_with("node-42")})  # fmt: skip
    roster, messages = Roster(), Messenger(grid, 0.3, OFF, Bill())
    roster.learn(messages, [9001, 17, 5], protocol.Header(1))
    assert roster.names([17, 9001, 5]) == ["partition-0", "partition-1", "node-5"]  # 5 never answered: its id
    assert roster.ordered([9001, 5, 17]) == [5, 17, 9001]  # "node-5" < "partition-0" < "partition-1"
    roster.learn(messages, [9001, 17, 5, 42], protocol.Header(2))
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [5, 17, 42, 9001]  # each asked once; 42 is new
    assert roster.name(42) == "node-42"


def test_two_nodes_claiming_one_partition_keep_an_order():
    grid = ScriptedGrid({3: answers_with("partition-0"), 2: answers_with("partition-0")})
    roster = Roster()
    roster.learn(Messenger(grid, 1, OFF, Bill()), [3, 2], protocol.Header(1))
    assert roster.ordered([3, 2]) == [2, 3]
