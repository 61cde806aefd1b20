"""Flower's Grid for the round loop: bytes billed once per message, replies decoded as they come, silence timed out."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from flwr.app import Message

from flowertune_llm.federated import protocol
from flowertune_llm.federated.messaging import Messenger, TooFewNodes, Window, wait_for_nodes
from flowertune_llm.observe.profiling import Recorder
from flowertune_llm.weights.streaming import Update
from flowertune_llm.weights.transport import to_record
from testbed.grids import ScriptedGrid, error_reply

ARRAYS = to_record({"w": torch.ones(16, 4, dtype=torch.bfloat16)})


@dataclass
class Bill:
    round: int = 3
    bytes_down: int = 0
    bytes_up: int = 0


def answer(message: Message) -> Message:
    reply = protocol.SendRes(ARRAYS).to_content()
    protocol.attach_events(reply, [{"kind": "span", "name": "train", "seconds": 0.5}])
    return Message(reply, reply_to=message)


def decode(content, node) -> Update[int]:
    return Update(node, {"w": protocol.SendRes.from_content(content).arrays})


def test_each_message_is_billed_in_full_each_way_and_replies_are_timed():
    grid = ScriptedGrid({1: answer, 2: answer, 3: lambda m: error_reply(m, "CUDA out of memory")})
    bill, profile = Bill(), Recorder("server")
    messages = Messenger(grid, timeout=5, profile=profile, bill=bill)
    pending = messages.push(protocol.SEND, protocol.TrainIns(protocol.Header(3), 1e-3, ["w"], protocol.Group(0, 1, ARRAYS)).to_content(), [1, 2, 3])
    updates = {u.client: u for u in messages.collect(pending, decode)}
    assert bill.bytes_down == 3 * ARRAYS.count_bytes()  # one content shared, three messages sent
    assert bill.bytes_up == 2 * ARRAYS.count_bytes()  # the error reply carries nothing
    assert updates[3].problem == "client error 0: CUDA out of memory" and updates[1].problem is None
    arrivals = [e for e in profile.events if e["kind"] == "arrival"]
    assert sorted(e["order"] for e in arrivals) == [1, 2, 3] and all(e["seconds"] >= 0 for e in arrivals)
    # A node's own profile events come back under its id and the round.
    assert [(e["node"], e["round"]) for e in profile.events if e.get("name") == "train"] == [(1, 3), (2, 3)]


def test_a_silent_node_is_named_with_the_timeout_it_missed():
    grid = ScriptedGrid({1: answer, 2: lambda m: None})
    messages = Messenger(grid, timeout=0.3, profile=Recorder("server"), bill=Bill())
    pending = messages.push(protocol.SEND, protocol.SendIns(protocol.Header(3), ["w"]).to_content(), [1, 2])
    updates = list(messages.collect(pending, decode))
    assert [u.client for u in updates] == [1, 2]
    assert updates[1].problem == "no reply within strategy.round-timeout=0.3s"


def test_a_window_pushes_ahead_once_per_item():
    pushed: list[int] = []
    window = Window(size=3, count=5)

    def push(index: int) -> dict[str, int]:
        pushed.append(index)
        return {f"m{index}": index}

    assert window.take(0, push) == {"m0": 0} and pushed == [0, 1, 2]
    assert window.take(1, push) == {"m1": 1} and pushed == [0, 1, 2, 3]
    assert [window.take(i, push) for i in (2, 3, 4)] == [{"m2": 2}, {"m3": 3}, {"m4": 4}]
    assert pushed == [0, 1, 2, 3, 4]  # never past the end, never twice


def test_waiting_for_nodes_gives_up_after_the_timeout(caplog):
    assert wait_for_nodes(ScriptedGrid({5: answer, 2: answer}), 2, timeout=1, log=logging.getLogger()) == [2, 5]
    with pytest.raises(TooFewNodes, match="only 1 node\\(s\\) connected after 0s"):
        wait_for_nodes(ScriptedGrid({5: answer}), 2, timeout=0, log=logging.getLogger())


def test_a_failure_is_kept_on_one_line_without_colours_and_short():
    from flowertune_llm.federated.messaging import REASON_CHARACTERS, short_reason

    traceback = "client error 2: \x1b[31mTraceback\x1b[0m (most recent call last):\n" + "  File x, line 1\n" * 400
    reason = short_reason(traceback)
    assert "\x1b" not in reason and "\n" not in reason and len(reason) == REASON_CHARACTERS and reason.endswith("…")
    assert short_reason("client error 0: boom") == "client error 0: boom"
