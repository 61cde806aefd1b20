"""Flower ``Grid`` stand-ins whose nodes run the app's real client handlers: in this process or in others.

* :class:`ScriptedGrid`: nodes are callables in this process (:class:`InProcessNode` runs the real
  handlers; a test wraps it to fail, stay silent or misbehave deterministically). It answers at push time
  and keeps the replies until the server pulls them, like a SuperLink.
* :class:`ProcessGrid`: each node is a spawned process (the benchmarks measure each process's memory on
  its own, with Flower's transport left out); contents travel pickled over a pipe.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from uuid import uuid4

from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


def stamp_server_identity(run_id: int = 7) -> None:
    """What Flower sets when it starts a ServerApp: messages stamp the sending task's identity."""
    for name, value in {"_run_id": run_id, "_node_id": 0, "_task_id": 1}.items():
        setattr(TaskIdentity, name, value)


def _stamp(message: Message) -> str:
    message_id = str(uuid4())
    message.metadata.__dict__["_message_id"] = message_id
    return message_id


def _from_node(reply: Message, original: Message) -> Message:
    reply.metadata.__dict__["_src_node_id"] = original.metadata.dst_node_id
    return reply


class LocalGrid(Grid):
    """The parts of Flower's Grid interface the round loop does not use."""

    def set_run(self, run):  # pragma: no cover - not used by the round loop
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        raise NotImplementedError


# --- in this process -------------------------------------------------------------------------------------

Behaviour = Callable[[Message], "Message | None"]  # None: the node never answers


class InProcessNode:
    """A node running the real client handlers in this process, with its own node config and state."""

    def __init__(self, run_config: Mapping, node_id: int, node_config: Mapping, run_id: int = 7):
        from flowertune_llm.config import NodeConfig, run_config_of
        from flowertune_llm.federated.client_round import NodeRound

        self.node_round = NodeRound(run_id, node_id, run_config_of(run_id, dict(run_config)), NodeConfig.parse(node_config))
        self.seen: list[str] = []

    def __call__(self, message: Message) -> Message | None:
        from flowertune_llm.federated.client_round import handle
        from flowertune_llm.observe.profiling import OFF

        self.seen.append(message.metadata.message_type)
        try:
            content = handle(message.metadata.message_type, message.content, self.node_round, OFF)
        except Exception as error:  # noqa: BLE001 - as Flower does: the ClientApp's exception becomes an error reply
            return error_reply(message, f"{type(error).__name__}: {error}")
        return Message(content, reply_to=message)


class ScriptedGrid(LocalGrid):
    """Nodes are :data:`Behaviour` s called at push time; their replies wait until pulled."""

    def __init__(self, behaviours: dict[int, Behaviour]):
        self.behaviours = behaviours
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}
        self.asked: set[str] = set()  # every message id the server has pulled (waited) for
        self.most_waiting: dict[str, int] = {}  # message type -> most replies of that type waiting to be pulled

    def get_node_ids(self) -> Iterable[int]:
        return list(self.behaviours)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = _stamp(message)
            self.sent.append(message)
            reply = self.behaviours[message.metadata.dst_node_id](message)
            if reply is not None:
                self._replies[message_id] = _from_node(reply, message)
            ids.append(message_id)
            kind = message.metadata.message_type
            waiting = sum(r.metadata.message_type == kind for r in self._replies.values())
            self.most_waiting[kind] = max(self.most_waiting.get(kind, 0), waiting)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        self.asked.update(message_ids)
        return [self._replies.pop(i) for i in message_ids if i in self._replies]


def error_reply(message: Message, reason: str) -> Message:
    """What Flower delivers when a node's handler raised."""
    return Message(Error(code=0, reason=reason), reply_to=message)


# --- in other processes ----------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class MemorySampler:
    """Peak anonymous memory (sampled every 20 ms) and VmHWM of this process."""

    def __init__(self) -> None:
        self.peak_anon = 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak_anon = max(self.peak_anon, _status()["RssAnon"])
            time.sleep(0.02)

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        self.peak_anon = _status()["RssAnon"]

    def snapshot(self) -> dict[str, float]:
        status = _status()
        self.peak_anon = max(self.peak_anon, status["RssAnon"])
        return {"anon_mb": status["RssAnon"] / 2**20, "peak_anon_mb": self.peak_anon / 2**20,
                "vmhwm_mb": status["VmHWM"] / 2**20}  # fmt: skip


def memory_sampler() -> MemorySampler:
    return MemorySampler()


def _serve(connection, node_id: int, node_config: dict, run_config: dict, run_id: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from flowertune_llm.config import NodeConfig, run_config_of
    from flowertune_llm.federated.client_round import NodeRound, handle
    from flowertune_llm.observe.profiling import OFF

    node_round = NodeRound(run_id, node_id, run_config_of(run_id, run_config), NodeConfig.parse(node_config))

    sampler = MemorySampler()
    sampler.reset()
    connection.send("ready")  # imports done: the round's clock should not include them
    while True:
        request = connection.recv()
        if request is None:
            connection.send(sampler.snapshot())
            return
        message_id, message_type, content = request
        try:
            reply = handle(message_type, content, node_round, OFF)
        except Exception as error:  # noqa: BLE001 - reported to the server like a Flower error reply
            reply = error
        del content, request
        connection.send((message_id, reply))
        del reply


class ProcessGrid(LocalGrid):
    """Nodes in spawned processes running the real client handlers; replies come back as they are ready."""

    def __init__(self, node_configs: list[dict], run_config: dict, run_id: int = 1):
        stamp_server_identity(run_id)
        context = multiprocessing.get_context("spawn")
        self._nodes = {}
        self._replies: queue.Queue = queue.Queue()
        self._ready: dict[str, Message] = {}
        self._sent: dict[str, Message] = {}
        for node_id, node_config in enumerate(node_configs, start=1):
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(child, node_id, node_config, run_config, run_id))
            process.start()
            self._nodes[node_id] = (parent, process)
        for parent, _ in self._nodes.values():
            if parent.recv() != "ready":
                raise RuntimeError("a node process failed to start")
            threading.Thread(target=self._receive, args=(parent,), daemon=True).start()

    def _receive(self, connection) -> None:
        while True:
            try:
                item = connection.recv()
            except (EOFError, OSError):
                return
            self._replies.put(item)
            if isinstance(item, dict):  # the memory report: last thing a node sends
                return

    def __enter__(self) -> ProcessGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, process in self._nodes.values():
            process.kill()

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = _stamp(message)
            self._sent[message_id] = message
            self._nodes[message.metadata.dst_node_id][0].send((message_id, message.metadata.message_type, message.content))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        while True:
            try:
                message_id, content = self._replies.get(timeout=0.05)
            except queue.Empty:
                break
            original = self._sent.pop(message_id)
            reply = (Message(Error(code=0, reason=repr(content)), reply_to=original) if isinstance(content, Exception)
                     else Message(content, reply_to=original))  # fmt: skip
            self._ready[message_id] = _from_node(reply, original)
        return [self._ready.pop(i) for i in list(message_ids) if i in self._ready]

    def memory(self) -> list[dict]:
        for connection, _ in self._nodes.values():
            connection.send(None)
        reports = []
        while len(reports) < len(self._nodes):
            item = self._replies.get(timeout=60)
            if isinstance(item, dict):
                reports.append(item)
        return reports


def train_content(adapter: Mapping, server_round: int, learning_rate: float = 1e-3) -> RecordDict:
    """A one-group ``train`` message's content carrying the whole global adapter, as the server sends it."""
    from flowertune_llm.federated import protocol
    from flowertune_llm.weights.tensors import specs_of
    from flowertune_llm.weights.transport import to_record

    group = protocol.Group(0, 1, to_record(adapter), specs_of(adapter))
    header = protocol.Header(server_round)
    return protocol.TrainIns(header, learning_rate, list(adapter), group).to_content()
