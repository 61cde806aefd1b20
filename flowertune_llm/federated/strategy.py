"""The server's round loop: FedAvg group by group, with the schedule, the bill and the checkpoints.

Flower's ``FedAvg.start`` holds every reply before averaging, drops late replies without a word and has
no checkpoint hook, so the loop is written out here. One round, for the sampled nodes
(the messages are federated/protocol.py's; federated/messaging.py moves them):

1. **down**: groups ``1..G-1`` of the global model as ``train.receive``;
2. **train**: ``train`` with the learning rate and the last group; each node trains (or, in an
   aggregation-only run, does not) and answers with the first group of its update and its FedAvg weight;
3. **up**: ``train.send`` for groups ``2..G``;
4. **evaluate** (every ``eval.every-round`` rounds and after the last): the round's new global model goes
   down to the nodes whose updates made it (``evaluate.receive``, then ``evaluate`` with the last group),
   and each answers with its held-out loss; the weighted mean is the round's ``eval_loss``.

Group messages go ``aggregation.window`` ahead per node (group 1 down goes alone: it starts the node's
round, which later groups must not race in the Simulation Engine, where one node's queued messages can
run side by side). Replies are pulled by message id, group by group, so the ones ahead wait in the
SuperLink, not here.

Every reply is folded into a running weighted sum as it arrives (weights/streaming.py), each finished
group is written to the round's checkpoint and freed, so the server holds one group's sum and the
replies in flight, never the model. ``all_at_once`` is the same loop with one group whose replies are
all held before averaging. The global model between rounds is the previous round's checkpoint on disk,
read back through mmap.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import RecordDict
from flwr.serverapp import Grid

from flowertune_llm.config import RunConfig
from flowertune_llm.federated import protocol
from flowertune_llm.federated.messaging import Messenger, Pending, TooFewNodes, Window, wait_for_nodes
from flowertune_llm.federated.run_directory import RunDirectory
from flowertune_llm.federated.schedule import cosine_annealing
from flowertune_llm.observe.profiling import OFF, Profiler
from flowertune_llm.units import MiB
from flowertune_llm.weights.disk import check_disk_space
from flowertune_llm.weights.exchange import Exchange
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.shards import ShardedCheckpointWriter
from flowertune_llm.weights.streaming import TooFewClients, Update, spec_mismatch, streaming_fedavg
from flowertune_llm.weights.transport import from_record, to_record

log = logging.getLogger(f"flwr.{__name__}")  # a child of Flower's logger, so `flwr log` shows it

# The FlowerTune leaderboard caps a run's total communication at 200,000 MB.
COMMUNICATION_BUDGET_MB = 200_000


@dataclass
class RoundRecord:
    """One round, as ``history.json`` keeps it."""

    round: int
    learning_rate: float
    train_loss: float | None = None  # None in aggregation-only runs
    nodes: list[int] = field(default_factory=list)  # sampled this round
    aggregated: list[int] = field(default_factory=list)  # whose update made it into the mean
    failures: dict[str, str] = field(default_factory=dict)  # node id -> why it was left out
    groups: int = 0
    restarts: int = 0  # a node failed after its share was folded: the round restarted without it
    bytes_down: int = 0  # counted by federated/messaging.py, each message in full (evaluation included)
    bytes_up: int = 0
    seconds: float = 0.0
    eval_loss: float | None = None  # the global model's held-out loss after this round, weighted by examples
    eval_examples: int = 0
    eval_nodes: list[int] = field(default_factory=list)  # whose loss is in eval_loss
    eval_failures: dict[str, str] = field(default_factory=dict)

    def leave_out(self, node: int, reason: str, failures: dict[str, str] | None = None) -> None:
        failures = self.failures if failures is None else failures
        if str(node) not in failures:
            failures[str(node)] = reason
            what = "left out" if failures is self.failures else "not evaluated"
            log.warning("Round %d: node %d %s: %s", self.round, node, what, reason)


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
        for server_round in range(1, self.config.num_server_rounds + 1):
            record = RoundRecord(server_round, self._learning_rate(server_round), groups=len(self.exchange.groups))
            self.history.append(record)
            self.profile.round = server_round
            with self.profile.span("round"):
                start = time.monotonic()
                try:
                    output = self._round(grid, current, record)
                    if self.config.eval.due(server_round, self.config.num_server_rounds):
                        self._evaluate(grid, output, record)
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

    def _learning_rate(self, server_round: int) -> float:
        train = self.config.train
        return cosine_annealing(server_round, self.config.num_server_rounds, train.learning_rate_max, train.learning_rate_min)

    def _kept(self, server_round: int) -> bool:
        """Checkpoints of every ``save-every-round``-th round and of the last round stay; the others (and the
        initial round-0 adapter) are scratch."""
        return server_round > 0 and (
            server_round % self.config.train.save_every_round == 0 or server_round == self.config.num_server_rounds
        )

    # --- one round ---------------------------------------------------------------------------------------------

    def _round(self, grid: Grid, current: Path | None, record: RoundRecord) -> Path:
        messages = Messenger(grid, self.config.strategy.round_timeout, self.profile, record)
        target = self.run_dir.checkpoint_dir(record.round)
        with self.profile.span("configure"):
            record.nodes = self._sample(grid)
            # Before anything moves: a round whose output cannot be written is not started.
            check_disk_space(target.parent, self.exchange.layout.total_bytes, what=f"the round-{record.round} checkpoint")

        source = LocalCheckpoint(current) if current is not None else nullcontext(None)
        with source as global_model:
            nodes = record.nodes
            if global_model is not None:
                nodes = self._send_down(messages, global_model, record, nodes, protocol.RECEIVE, record.failures)
            trained = messages.push(protocol.TRAIN, self._train_ins(global_model, record), nodes)

        losses: dict[int, float] = {}
        uploads = _Uploads(self, messages, record, trained, losses)
        try:
            result = streaming_fedavg(
                self.exchange.specs, self.exchange.groups, nodes, uploads, lambda: self._output(target),
                min_clients=self.config.strategy.min_train_nodes, span=self.profile.span,
            )  # fmt: skip
        except TooFewClients as failure:
            for node, reason in failure.left_out.items():
                record.leave_out(node, reason)
            raise RoundFailed(
                f"round {record.round}: {failure.usable} usable update(s), fewer than strategy.min-train-nodes="
                f"{self.config.strategy.min_train_nodes}; left out: {record.failures or 'none'}"
            ) from None
        for node, reason in result.left_out.items():
            record.leave_out(node, reason)
        record.aggregated, record.restarts = result.aggregated, result.restarts
        if losses:
            total = sum(result.weights.values())
            record.train_loss = sum(losses[n] * result.weights[n] for n in result.aggregated) / total
        return target

    def _sample(self, grid: Grid) -> list[int]:
        """``fraction-train`` of the connected nodes, at least ``min-train-nodes``, waiting for that many to connect."""
        strategy = self.config.strategy
        try:
            node_ids = wait_for_nodes(grid, strategy.min_train_nodes, strategy.round_timeout, log)
        except TooFewNodes as error:
            raise RoundFailed(f"{error}; strategy.min-train-nodes={strategy.min_train_nodes}") from None
        size = min(len(node_ids), max(int(len(node_ids) * strategy.fraction_train), strategy.min_train_nodes))
        return sorted(self._rng.sample(node_ids, size))

    def _send_down(self, messages: Messenger, global_model: LocalCheckpoint, record: RoundRecord, nodes: list[int],
                   message_type: str, failures: dict[str, str]) -> list[int]:  # fmt: skip
        """Groups ``1..G-1`` down; returns the nodes that stored them all (the last group goes with the
        ``train`` or ``evaluate`` message that follows). A node that fails is named in ``failures``."""
        nodes, last = list(nodes), len(self.exchange.groups) - 1

        def push(index: int) -> Pending:
            ins = protocol.ReceiveIns(self.header(record), self._group(global_model, index))
            return messages.push(message_type, ins.to_content(), nodes)

        window = Window(self.config.aggregation.window, count=last)
        for index in range(last):
            # Group 1 goes alone: it starts the node's round. Later ones go a window ahead.
            pending = push(index) if index == 0 else window.take(index, push)
            pending = {message: node for message, node in pending.items() if str(node) not in failures}
            for update in messages.collect(pending, lambda content, node: Update(node)):
                if update.problem:
                    record.leave_out(update.client, f"group {index + 1} down: {update.problem}", failures)
            nodes = [n for n in nodes if str(n) not in failures]
        return nodes

    def _evaluate(self, grid: Grid, model: Path, record: RoundRecord) -> None:
        """The round's new global model, sent to the nodes whose updates made it, scored on their held-out data."""
        messages = Messenger(grid, self.config.strategy.round_timeout, self.profile, record)
        with self.profile.span("evaluate"), LocalCheckpoint(model) as global_model:
            nodes = self._send_down(messages, global_model, record, record.aggregated, protocol.EVALUATE_RECEIVE,
                                    record.eval_failures)  # fmt: skip
            last = self._group(global_model, len(self.exchange.groups) - 1)
            pending = messages.push(protocol.EVALUATE, protocol.EvaluateIns(self.header(record), last).to_content(), nodes)
            losses: dict[int, float] = {}
            for update in messages.collect(pending, lambda content, node: self._decode_eval(content, node, losses)):
                if update.problem:
                    record.leave_out(update.client, f"evaluate: {update.problem}", record.eval_failures)
                else:
                    record.eval_nodes.append(update.client)
                    record.eval_examples += int(update.weight)
        if record.eval_examples:
            record.eval_loss = sum(losses[n] for n in record.eval_nodes) / record.eval_examples
            log.info("[round %d/%d] eval_loss %.4f on %d held-out examples of %d node(s)", record.round,
                     self.config.num_server_rounds, record.eval_loss, record.eval_examples, len(record.eval_nodes))  # fmt: skip
        else:
            log.warning("Round %d: no node evaluated the global model: %s", record.round, record.eval_failures or "none asked")

    def _train_ins(self, global_model: LocalCheckpoint | None, record: RoundRecord) -> RecordDict:
        last = len(self.exchange.groups) - 1
        group = self._group(global_model, last) if global_model is not None else None
        ins = protocol.TrainIns(self.header(record), record.learning_rate, self.exchange.group_keys(0), group)
        return ins.to_content()

    def header(self, record: RoundRecord) -> protocol.Header:
        return protocol.Header(record.round, self.profile.enabled)

    def _group(self, global_model: LocalCheckpoint, index: int) -> protocol.Group:
        # The first group carries every tensor's shape: the node must know when it has the whole model.
        manifest = self.exchange.specs if index == 0 else None
        with self.profile.span("configure", group=index):
            arrays = to_record(global_model.group(self.exchange.group_keys(index)))
        return protocol.Group(index, len(self.exchange.groups), arrays, manifest)

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

    # --- replies -----------------------------------------------------------------------------------------------

    def decode_train(self, content: RecordDict, node: int, losses: dict[int, float]) -> Update[int]:
        try:
            reply = protocol.TrainRes.from_content(content)
        except protocol.ProtocolError as error:
            return Update(node, problem=str(error))
        mismatch = spec_mismatch(self.exchange.specs, reply.manifest)
        if mismatch:
            return Update(node, problem=f"holds weights unlike the global model's: {mismatch}")
        if not self.config.aggregation_only:
            loss = reply.train_loss if reply.train_loss is not None else math.nan
            if not math.isfinite(loss):
                return Update(node, problem=f"update rejected: train_loss={loss}")
            losses[node] = loss
        return Update(node, from_record(reply.arrays), weight=reply.weight)

    @staticmethod
    def _decode_eval(content: RecordDict, node: int, losses: dict[int, float]) -> Update[int]:
        try:
            reply = protocol.EvaluateRes.from_content(content)
        except protocol.ProtocolError as error:
            return Update(node, problem=str(error))
        if not math.isfinite(reply.loss) or reply.examples < 1:
            return Update(node, problem=f"eval_loss={reply.loss} over {reply.examples} examples")
        losses[node] = reply.loss * reply.examples  # summed, divided by all examples once every node is in
        return Update(node, weight=reply.examples)

    @staticmethod
    def decode_group(content: RecordDict, node: int) -> Update[int]:
        try:
            return Update(node, from_record(protocol.SendRes.from_content(content).arrays))
        except protocol.ProtocolError as error:
            return Update(node, problem=str(error))

    def _log_round(self, record: RoundRecord) -> None:
        total_mb = self.total_bytes / MiB
        loss = "-" if record.train_loss is None else f"{record.train_loss:.4f}"
        log.info(
            "[round %d/%d] train_loss %s | lr %.3g | %d/%d nodes | %d group(s) | down %.2f MiB, up %.2f MiB, "
            "total %.2f MiB | %.1f s",
            record.round, self.config.num_server_rounds, loss, record.learning_rate, len(record.aggregated),
            len(record.nodes), record.groups, record.bytes_down / MiB, record.bytes_up / MiB, total_mb, record.seconds,
        )  # fmt: skip
        if total_mb > COMMUNICATION_BUDGET_MB and not self._budget_warned:
            self._budget_warned = True
            log.warning(
                "Communication so far (%.0f MiB) exceeds the FlowerTune leaderboard budget of %d MB",
                total_mb, COMMUNICATION_BUDGET_MB,
            )  # fmt: skip


class _Uploads:
    """Each group's replies for :func:`streaming_fedavg`: the train replies for group 1, ``train.send`` after.

    ``train.send`` for the next ``aggregation.window`` groups goes out once the train replies are in (never
    alongside the train message: in the Simulation Engine it could overtake it). A restart without a node
    changes who is asked, so what was asked ahead of the old set is dropped.
    """

    def __init__(self, strategy: StreamingFedAvg, messages: Messenger, record: RoundRecord, trained: Pending,
                 losses: dict[int, float]):  # fmt: skip
        self.strategy, self.messages, self.record, self.losses = strategy, messages, record, losses
        self.trained: Pending | None = trained
        self.asked_of: list[int] = []
        self.window = Window(0, 0)

    def __call__(self, clients: Sequence[int], index: int) -> Iterable[Update[int]]:
        config, exchange = self.strategy.config, self.strategy.exchange
        if index == 0 and self.trained is not None:
            trained, self.trained = self.trained, None
            replies = self.messages.collect(trained, lambda c, node: self.strategy.decode_train(c, node, self.losses))
        else:
            if list(clients) != self.asked_of:
                self.asked_of = list(clients)
                self.window = Window(config.aggregation.window, count=len(exchange.groups))

            def push(ahead: int) -> Pending:
                ins = protocol.SendIns(self.strategy.header(self.record), exchange.group_keys(ahead))
                return self.messages.push(protocol.SEND, ins.to_content(), clients)

            replies = self.messages.collect(self.window.take(index, push), self.strategy.decode_group)
        # all_at_once holds every reply before averaging; layerwise folds each as it arrives.
        return replies if config.aggregation.mode == "layerwise" else list(replies)
