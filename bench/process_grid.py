"""A Flower ``Grid`` whose nodes are local processes running the app's client handlers, for benchmarks.

Each node is a spawned process that answers ``(message id, message type, content)`` with the reply content
of ``client_round.handle``; contents travel pickled over a pipe. It stands in for the Simulation Engine
where a benchmark must see each process's memory on its own and leave Flower's transport out.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


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
    from flowertune_llm import client_round
    from flowertune_llm.profiling import OFF

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
            reply = client_round.handle(message_type, content, run_config, node_config, run_id, node_id, OFF)
        except Exception as error:  # noqa: BLE001 - reported to the server like a Flower error reply
            reply = error
        del content, request
        connection.send((message_id, reply))
        del reply


class ProcessGrid(Grid):
    def __init__(self, node_configs: list[dict], run_config: dict, run_id: int = 1):
        for name, value in {"_run_id": run_id, "_node_id": 0, "_task_id": 1}.items():
            setattr(TaskIdentity, name, value)  # what Flower sets when it starts a ServerApp
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

    def memory(self) -> list[dict]:
        for connection, _ in self._nodes.values():
            connection.send(None)
        reports = []
        while len(reports) < len(self._nodes):
            item = self._replies.get(timeout=60)
            if isinstance(item, dict):
                reports.append(item)
        return reports

    # Grid
    def set_run(self, run):  # pragma: no cover
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            self._sent[message_id] = message
            self._nodes[message.metadata.dst_node_id][0].send((message_id, message.metadata.message_type, message.content))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        from flwr.app import Error

        while True:
            try:
                message_id, content = self._replies.get(timeout=0.05)
            except queue.Empty:
                break
            original = self._sent.pop(message_id)
            reply = (
                Message(Error(code=0, reason=repr(content)), reply_to=original)
                if isinstance(content, Exception)
                else Message(content, reply_to=original)
            )
            reply.metadata.__dict__["_src_node_id"] = original.metadata.dst_node_id
            self._ready[message_id] = reply
        return [self._ready.pop(i) for i in list(message_ids) if i in self._ready]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        raise NotImplementedError
