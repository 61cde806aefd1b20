"""The server's round loop: FedAvg group by group, with the schedule, the bill and the checkpoints.

Flower's ``FedAvg.start`` holds every reply before averaging, drops late replies without a word and has
no checkpoint hook, so the loop is written out here on Flower's ``Grid``. One round, for the sampled nodes:

1. **down**: groups ``1..G-1`` of the global model as ``train.receive`` messages;
2. **train**: a ``train`` message with the learning rate and the last group; each node trains (or, in an
   aggregation-only run, does not) and answers with the first group of its update and its FedAvg weight;
3. **up**: ``train.send`` for groups ``2..G``.

Group messages are kept ``aggregation.window`` in flight per node (group 1 down goes alone: it starts the
node's round), so a node finds its next group waiting when it answers: in the Deployment Engine a SuperNode
that finds no message sleeps 3 s before it asks again, which one group at a time paid on every group.
Replies are pulled by message id, group by group, so the ones ahead wait in the SuperLink, not here.

Every reply is folded into a running weighted sum as it arrives (streaming.py), each finished group is
written to the round's checkpoint and freed, so the server holds one group's sum and the replies in flight,
never the model. ``all_at_once`` is the same loop with one group whose replies are all held before
averaging (the standard path, kept for comparison); with one group both modes move the same single message
each way, so the adapter runs of the quickstart cost one round trip per round in either mode.

The global model between rounds is the previous round's checkpoint on disk, read back through mmap.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from flowertune_llm.checkpoint import RunDirectory
from flowertune_llm.config import RunConfig
from flowertune_llm.exchange import RECEIVE, SEND, TRAIN, Exchange
from flowertune_llm.profiling import OFF, Profiler, events_from_reply
from flowertune_llm.schedule import cosine_annealing
from flowertune_llm.shards import LocalCheckpoint, ShardedCheckpointWriter, check_disk_space
from flowertune_llm.streaming import TooFewClients, Update, spec_mismatch, streaming_fedavg
from flowertune_llm.transport import from_record, specs_from_json, specs_to_json, to_record

log = logging.getLogger(f"flwr.{__name__}")  # a child of Flower's logger, so `flwr log` shows it

# The FlowerTune leaderboard caps a run's total communication at 200,000 MB.
COMMUNICATION_BUDGET_MB = 200_000
MB = 1024 * 1024
_POLL_SECONDS = 0.2


@dataclass
class RoundRecord:
    round: int
    learning_rate: float
    train_loss: float | None = None  # None in aggregation-only runs
    nodes: list[int] = field(default_factory=list)  # sampled this round
    aggregated: list[int] = field(default_factory=list)  # whose update made it into the mean
    failures: dict[str, str] = field(default_factory=dict)  # node id -> why it was left out
    groups: int = 0
    restarts: int = 0  # a node failed after its share was folded: the round restarted without it
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0


class RoundFailed(RuntimeError):
    """Fewer usable updates than ``strategy.min-train-nodes``: the run stops rather than average too few."""


class StreamingFedAvg:
    def __init__(self, config: RunConfig, run_dir: RunDirectory, exchange: Exchange, profile: Profiler = OFF):
        self.config = config
        self.run_dir = run_dir
        self.exchange = exchange
        self.profile = profile
        self.history: list[RoundRecord] = []
        self._rng = random.Random(config.train.seed)
        self._budget_warned = False

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes_down + r.bytes_up for r in self.history)

    def run(self, grid: Grid, initial: Path | None) -> Path:
        """Run every round from the global model at ``initial`` (None: the nodes' own copies); return the last."""
        current = initial
        num_rounds = self.config.num_server_rounds
        for server_round in range(1, num_rounds + 1):
            record = RoundRecord(
                round=server_round,
                learning_rate=cosine_annealing(
                    server_round, num_rounds, self.config.train.learning_rate_max, self.config.train.learning_rate_min
                ),
                groups=len(self.exchange.groups),
            )
            self.history.append(record)
            self.profile.round = server_round
            with self.profile.span("round"):
                start = time.monotonic()
                try:
                    output = self._round(grid, current, record)
                finally:
                    record.seconds = time.monotonic() - start
                    with self.profile.span("history"):
                        self.run_dir.save_history([asdict(r) for r in self.history])
            self._log_round(record)
            if current is not None and not self._kept(server_round - 1):
                shutil.rmtree(current)  # the previous global model, superseded and not a saved checkpoint
            current = output
            if self._kept(server_round):
                log.info("Saved the round-%d %s to %s", server_round, self.exchange.label, output)
            self.profile.memory()
        return current

    def _kept(self, server_round: int) -> bool:
        """Checkpoints of every ``save-every-round``-th round and of the last round stay; the others (and the
        initial round-0 adapter) are scratch."""
        return server_round > 0 and (
            server_round % self.config.train.save_every_round == 0 or server_round == self.config.num_server_rounds
        )

    # --- one round ---------------------------------------------------------------------------------------------

    def _round(self, grid: Grid, current: Path | None, record: RoundRecord) -> Path:
        exchange, target = self.exchange, self.run_dir.checkpoint_dir(record.round)
        with self.profile.span("configure"):
            record.nodes = self._sample_nodes(grid)
            # Before anything moves: a round whose output cannot be written is not started.
            check_disk_space(target.parent, exchange.layout.total_bytes, what=f"the round-{record.round} checkpoint")
        source = LocalCheckpoint(current) if current is not None else nullcontext(None)
        with source as global_model:
            nodes = list(record.nodes)
            if global_model is not None:
                nodes = self._send_down(grid, global_model, nodes, record)
            train_replies = self._push_train(grid, global_model, nodes, record)
        losses: dict[int, float] = {}
        asked: dict[int, dict[str, int]] = {}  # train.send pushed ahead: group index -> pending replies
        asked_of: list[int] = []  # the nodes they went to (a restart changes them, and drops what was asked)

        def fetch(clients: Sequence[int], index: int) -> Iterator[Update[int]]:
            nonlocal train_replies
            if index == 0 and train_replies is not None:
                pending, train_replies = train_replies, None
                replies = self._collect(grid, pending, record, lambda reply, node: self._decode_train(reply, node, losses))
            else:
                if list(clients) != asked_of:
                    asked.clear()
                    asked_of[:] = clients
                for ahead in range(index, min(index + self.config.aggregation.window, len(exchange.groups))):
                    if ahead not in asked:
                        keys = exchange.group_keys(ahead)
                        content = RecordDict({"config": ConfigRecord({"server-round": record.round, "keys": keys})})
                        asked[ahead] = self._push(grid, SEND, content, clients, record)
                replies = self._collect(grid, asked.pop(index), record, self._decode_group)
            # all_at_once holds every reply before averaging; layerwise folds each as it arrives.
            return replies if self.config.aggregation.mode == "layerwise" else iter(list(replies))

        try:
            result = streaming_fedavg(
                exchange.specs, exchange.groups, nodes, fetch, lambda: self._output(target),
                min_clients=self.config.strategy.min_train_nodes, span=self.profile.span,
            )  # fmt: skip
        except TooFewClients as failure:
            for node, reason in failure.left_out.items():
                self._leave_out(record, node, reason)
            raise RoundFailed(
                f"round {record.round}: {failure.usable} usable update(s), fewer than strategy.min-train-nodes="
                f"{self.config.strategy.min_train_nodes}; left out: {record.failures or 'none'}"
            ) from None
        for node, reason in result.left_out.items():
            self._leave_out(record, node, reason)
        record.aggregated, record.restarts = result.aggregated, result.restarts
        if losses:
            total = sum(result.weights.values())
            record.train_loss = sum(losses[n] * result.weights[n] for n in result.aggregated) / total
        return target

    @contextmanager
    def _output(self, target: Path) -> Iterator[ShardedCheckpointWriter]:
        writer = self.exchange.writer(target)
        with self.profile.span("checkpoint", step="open"):
            writer.open()
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        with self.profile.span("checkpoint", step="commit"):
            writer.commit()

    # --- messages ----------------------------------------------------------------------------------------------

    def _group_content(self, global_model: LocalCheckpoint, index: int, record: RoundRecord) -> RecordDict:
        config = {"server-round": record.round, "group": index, "groups": len(self.exchange.groups)}
        if index == 0:  # the node needs every tensor's shape to know when it has the whole model
            config["manifest"] = specs_to_json(self.exchange.specs)
        with self.profile.span("configure", group=index):
            arrays = to_record(global_model.group(self.exchange.group_keys(index)))
        return RecordDict({"arrays": arrays, "config": ConfigRecord(config)})

    def _send_down(self, grid: Grid, global_model: LocalCheckpoint, nodes: list[int], record: RoundRecord) -> list[int]:
        """Groups ``1..G-1`` down, ``aggregation.window`` in flight; returns the nodes that stored them all.

        Group 1 goes alone: it starts the node's round (and its state on a new run), which later groups must
        not race in the Simulation Engine, where one node's queued messages can run side by side.
        """
        in_flight: deque[tuple[int, dict[str, int]]] = deque()
        for index in range(len(self.exchange.groups) - 1):
            content = self._group_content(global_model, index, record)
            in_flight.append((index, self._push(grid, RECEIVE, content, nodes, record)))
            if index == 0 or len(in_flight) >= self.config.aggregation.window:
                nodes = self._stored(grid, *in_flight.popleft(), nodes, record)
        while in_flight:
            nodes = self._stored(grid, *in_flight.popleft(), nodes, record)
        return nodes

    def _stored(self, grid: Grid, index: int, pending: dict[str, int], nodes: list[int], record: RoundRecord) -> list[int]:
        """Wait for the nodes' acknowledgements of group ``index``; a node already left out is not waited for."""
        pending = {message: node for message, node in pending.items() if str(node) not in record.failures}
        for update in self._collect(grid, pending, record, lambda reply, node: Update(node)):
            if update.problem:
                self._leave_out(record, update.client, f"group {index + 1} down: {update.problem}")
        return [n for n in nodes if str(n) not in record.failures]

    def _push_train(
        self, grid: Grid, global_model: LocalCheckpoint | None, nodes: list[int], record: RoundRecord
    ) -> dict[str, int]:
        last = len(self.exchange.groups) - 1
        content = self._group_content(global_model, last, record) if global_model is not None else RecordDict(
            {"config": ConfigRecord({"server-round": record.round})}
        )
        config = content["config"]
        config["learning-rate"] = record.learning_rate
        config["reply-keys"] = self.exchange.group_keys(0)
        return self._push(grid, TRAIN, content, nodes, record)

    def _push(self, grid: Grid, message_type: str, content: RecordDict, nodes: Sequence[int], record: RoundRecord) -> dict[str, int]:
        messages = [
            Message(content, dst_node_id=node, message_type=message_type, ttl=self.config.strategy.round_timeout)
            for node in nodes
        ]
        with self.profile.span("send", messages=len(messages), type=message_type):
            pending = dict(zip(grid.push_messages(messages), nodes))
        # One record shared by every message of the push; each message is billed (and travels) in full.
        message_bytes = content["arrays"].count_bytes() if "arrays" in content else 0
        for node in nodes:
            record.bytes_down += message_bytes
            self.profile.emit({"kind": "message", "node": node, "direction": "down", "bytes": message_bytes})
        return pending

    def _collect(self, grid: Grid, pending: dict[str, int], record: RoundRecord, decode) -> Iterator[Update[int]]:
        """Replies to ``pending`` as they arrive, decoded; a node silent for ``round-timeout`` comes out as failed.

        ``strategy.round-timeout`` bounds each exchange (the training, or one group), counted like the
        messages' TTL from when they were sent.
        """
        pending, asked = dict(pending), len(pending)
        started = time.perf_counter()  # every collect starts right after its push: arrivals are timed from here
        deadline = time.monotonic() + self.config.strategy.round_timeout
        waited, wait_start = 0.0, time.time()
        try:
            while pending and time.monotonic() < deadline:
                poll_start = time.perf_counter()
                replies = list(grid.pull_messages(list(pending)))
                if not replies:
                    time.sleep(_POLL_SECONDS)
                waited += time.perf_counter() - poll_start
                for reply in replies:
                    node = pending.pop(reply.metadata.reply_to_message_id)
                    self.profile.emit(
                        {"kind": "arrival", "node": node, "order": asked - len(pending),
                         "seconds": time.perf_counter() - started}
                    )  # fmt: skip
                    yield self._check_reply(reply, node, record, decode)
            for node in pending.values():
                yield Update(node, problem=f"no reply within strategy.round-timeout={self.config.strategy.round_timeout:g}s")
        finally:
            self.profile.record_span("wait", waited, wait_start)

    def _check_reply(self, reply: Message, node: int, record: RoundRecord, decode) -> Update[int]:
        if reply.has_error():
            return Update(node, problem=f"client error {reply.error.code}: {reply.error.reason}")
        content = reply.content
        for event in events_from_reply(content):
            self.profile.emit({**event, "node": node, "round": record.round})
        if "arrays" in content:
            reply_bytes = content["arrays"].count_bytes()
            record.bytes_up += reply_bytes
            self.profile.emit({"kind": "message", "node": node, "direction": "up", "bytes": reply_bytes})
        with self.profile.span("decode", from_node=node):
            return decode(content, node)

    def _decode_group(self, content: RecordDict, node: int) -> Update[int]:
        if "arrays" not in content:
            return Update(node, problem="reply lacks 'arrays'")
        return Update(node, from_record(content["arrays"]))

    def _decode_train(self, content: RecordDict, node: int, losses: dict[int, float]) -> Update[int]:
        if "metrics" not in content or "config" not in content:
            return Update(node, problem="reply lacks 'metrics' or 'config'")
        mismatch = spec_mismatch(self.exchange.specs, specs_from_json(str(content["config"]["manifest"])))
        if mismatch:
            return Update(node, problem=f"holds weights unlike the global model's: {mismatch}")
        metrics = content["metrics"]
        weight = float(metrics.get("weight", 0))
        if not self.config.aggregation_only:
            loss = float(metrics.get("train_loss", float("nan")))
            if not math.isfinite(loss):
                return Update(node, problem=f"update rejected: train_loss={loss}")
            losses[node] = loss
        update = self._decode_group(content, node)
        update.weight = weight
        return update

    @staticmethod
    def _leave_out(record: RoundRecord, node: int, reason: str) -> None:
        if str(node) in record.failures:
            return
        record.failures[str(node)] = reason
        log.warning("Round %d: node %d left out: %s", record.round, node, reason)

    def _sample_nodes(self, grid: Grid) -> list[int]:
        """``fraction-train`` of the connected nodes, at least ``min-train-nodes``, waiting for that many to connect."""
        strategy = self.config.strategy
        deadline = time.monotonic() + strategy.round_timeout
        while True:
            node_ids = sorted(grid.get_node_ids())
            if len(node_ids) >= strategy.min_train_nodes:
                break
            if time.monotonic() > deadline:
                raise RoundFailed(
                    f"only {len(node_ids)} node(s) connected after {strategy.round_timeout:g}s; "
                    f"strategy.min-train-nodes={strategy.min_train_nodes}"
                )
            log.info("Waiting for nodes: %d connected, %d needed", len(node_ids), strategy.min_train_nodes)
            time.sleep(2)
        size = min(len(node_ids), max(int(len(node_ids) * strategy.fraction_train), strategy.min_train_nodes))
        return sorted(self._rng.sample(node_ids, size))

    def _log_round(self, record: RoundRecord) -> None:
        total_mb = self.total_bytes / MB
        loss = "-" if record.train_loss is None else f"{record.train_loss:.4f}"
        log.info(
            "[round %d/%d] train_loss %s | lr %.3g | %d/%d nodes | %d group(s) | down %.2f MB, up %.2f MB, "
            "total %.2f MB | %.1f s",
            record.round,
            self.config.num_server_rounds,
            loss,
            record.learning_rate,
            len(record.aggregated),
            len(record.nodes),
            record.groups,
            record.bytes_down / MB,
            record.bytes_up / MB,
            total_mb,
            record.seconds,
        )
        if total_mb > COMMUNICATION_BUDGET_MB and not self._budget_warned:
            self._budget_warned = True
            log.warning(
                "Communication so far (%.0f MB) exceeds the FlowerTune leaderboard budget of %d MB",
                total_mb,
                COMMUNICATION_BUDGET_MB,
            )
