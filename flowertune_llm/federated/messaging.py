"""Flower's Grid for the round loop: push, collect with a timeout, count bytes, time arrivals, keep a window.

Nothing here decides anything about a round: which nodes, which groups and what a reply means come from
federated/strategy.py. This module only moves messages and measures them, and it is where a round's bytes
are counted (each message once, in full, as ``ArrayRecord.count_bytes()`` counts its weights).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from flowertune_llm.federated.protocol import arrays_of, events_of
from flowertune_llm.observe.profiling import Profiler
from flowertune_llm.weights.streaming import Update

Pending = dict[str, int]  # message id -> the node it went to
Decode = Callable[[RecordDict, int], Update[int]]  # a reply's content, its node -> an update or a problem

_POLL_SECONDS = 0.2
_WAIT_FOR_NODES_SECONDS = 2


class Bill(Protocol):
    """Where a round's bytes are added up (federated/strategy.py's RoundRecord)."""

    round: int
    bytes_down: int
    bytes_up: int


class Messenger:
    """One round's messages: every push billed, every collect bounded by ``timeout`` and timed."""

    def __init__(self, grid: Grid, timeout: float, profile: Profiler, bill: Bill):
        self.grid, self.timeout, self.profile, self.bill = grid, timeout, profile, bill

    def push(self, message_type: str, content: RecordDict, nodes: Sequence[int]) -> Pending:
        """Send ``content`` to every node; the messages live ``timeout`` seconds (their TTL)."""
        messages = [Message(content, dst_node_id=node, message_type=message_type, ttl=self.timeout) for node in nodes]
        with self.profile.span("send", messages=len(messages), type=message_type):
            pending = dict(zip(self.grid.push_messages(messages), nodes))
        # One content shared by every message of the push; each message is billed (and travels) in full.
        arrays = arrays_of(content)
        size = arrays.count_bytes() if arrays is not None else 0
        for node in nodes:
            self.bill.bytes_down += size
            self.profile.emit({"kind": "message", "node": node, "direction": "down", "bytes": size})
        return pending

    def collect(self, pending: Pending, decode: Decode) -> Iterator[Update[int]]:
        """Replies to ``pending`` as they arrive, decoded; a node silent for ``timeout`` comes out as failed.

        The timeout bounds each exchange (the training, or one group), counted like the messages' TTL from
        when they were sent: every collect starts right after its push, so arrivals are timed from here.
        """
        pending, asked = dict(pending), len(pending)
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        waited, wait_start = 0.0, time.time()
        try:
            while pending and time.monotonic() < deadline:
                poll_start = time.perf_counter()
                replies = list(self.grid.pull_messages(list(pending)))
                if not replies:
                    time.sleep(_POLL_SECONDS)
                waited += time.perf_counter() - poll_start
                for reply in replies:
                    node = pending.pop(reply.metadata.reply_to_message_id)
                    self.profile.emit({"kind": "arrival", "node": node, "order": asked - len(pending),
                                       "seconds": time.perf_counter() - started})  # fmt: skip
                    yield self._received(reply, node, decode)
            for node in pending.values():
                yield Update(node, problem=f"no reply within strategy.round-timeout={self.timeout:g}s")
        finally:
            self.profile.record_span("wait", waited, wait_start)

    def _received(self, reply: Message, node: int, decode: Decode) -> Update[int]:
        if reply.has_error():
            return Update(node, problem=short_reason(f"client error {reply.error.code}: {reply.error.reason}"))
        content = reply.content
        for event in events_of(content):
            self.profile.emit({**event, "node": node, "round": self.bill.round})
        arrays = arrays_of(content)
        if arrays is not None:
            size = arrays.count_bytes()
            self.bill.bytes_up += size
            self.profile.emit({"kind": "message", "node": node, "direction": "up", "bytes": size})
        with self.profile.span("decode", from_node=node):
            return decode(content, node)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
REASON_CHARACTERS = 300


def short_reason(text: str) -> str:
    """A failure as history.json keeps it: without terminal colours, on one line, at most 300 characters (a
    node's whole traceback stays in its own log: the worker log in deployment, Flower's in simulation)."""
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= REASON_CHARACTERS else text[: REASON_CHARACTERS - 1] + "…"


class Window:
    """Messages for items ``0..count-1`` pushed up to ``size`` ahead of the one being waited for.

    In the Deployment Engine a SuperNode that finds no message sleeps 3 s before it asks again; with the
    next group already waiting it never does (bench/layerwise_deployment.py: a round of small groups
    halves at a window of 2). Each item is pushed once; :meth:`take` returns its pending replies.
    """

    def __init__(self, size: int, count: int):
        self.size, self.count = size, count
        self._pushed: dict[int, Pending] = {}

    def take(self, index: int, push: Callable[[int], Pending]) -> Pending:
        for ahead in range(index, min(index + self.size, self.count)):
            if ahead not in self._pushed:
                self._pushed[ahead] = push(ahead)
        return self._pushed.pop(index)


class TooFewNodes(RuntimeError):
    """Fewer nodes connected than a round needs, for longer than it may wait."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, log) -> list[int]:
    """The connected nodes, sorted, once there are at least ``minimum`` (waiting up to ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= minimum:
            return node_ids
        if time.monotonic() > deadline:
            raise TooFewNodes(f"only {len(node_ids)} node(s) connected after {timeout:g}s")
        log.info("Waiting for nodes: %d connected, %d needed", len(node_ids), minimum)
        time.sleep(_WAIT_FOR_NODES_SECONDS)
