"""The server's round loop: FedAvg over adapter weights, with the schedule, the bill and the checkpoints.

Flower's ``FedAvg.start`` holds every reply before averaging, drops late replies without a word and has
no checkpoint hook, so the loop is written out here on Flower's ``Grid``: push one message per sampled
node, pull replies one by one and fold each into a running weighted sum as it arrives, and name every
node whose reply failed, was rejected or came too late.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from peft import PeftConfig

from flowertune_llm.aggregation import WeightedMean, weighted_average
from flowertune_llm.checkpoint import RunDirectory
from flowertune_llm.config import RunConfig
from flowertune_llm.profiling import OFF, Profiler, events_from_reply
from flowertune_llm.schedule import cosine_annealing

log = logging.getLogger(f"flwr.{__name__}")  # a child of Flower's logger, so `flwr log` shows it

# The FlowerTune leaderboard caps a run's total communication at 200,000 MB.
COMMUNICATION_BUDGET_MB = 200_000
MB = 1024 * 1024
_POLL_SECONDS = 0.2


@dataclass
class RoundRecord:
    round: int
    learning_rate: float
    train_loss: float | None = None
    nodes: list[int] = field(default_factory=list)  # sampled this round
    aggregated: list[int] = field(default_factory=list)  # whose update made it into the mean
    failures: dict[str, str] = field(default_factory=dict)  # node id -> why it was left out
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0


def to_array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(v) for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class RoundFailed(RuntimeError):
    """Fewer usable updates than ``strategy.min-train-nodes``: the run stops rather than average too few."""


class AdapterFedAvg:
    def __init__(self, config: RunConfig, run_dir: RunDirectory, peft_config: PeftConfig, profile: Profiler = OFF):
        self.config = config
        self.run_dir = run_dir
        self.peft_config = peft_config
        self.profile = profile
        self.history: list[RoundRecord] = []
        self._rng = random.Random(config.train.seed)
        self._budget_warned = False

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes_down + r.bytes_up for r in self.history)

    def run(self, grid: Grid, initial_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        state = initial_state
        num_rounds = self.config.num_server_rounds
        for server_round in range(1, num_rounds + 1):
            record = RoundRecord(
                round=server_round,
                learning_rate=cosine_annealing(
                    server_round, num_rounds, self.config.train.learning_rate_max, self.config.train.learning_rate_min
                ),
            )
            self.history.append(record)
            self.profile.round = server_round
            with self.profile.span("round"):
                start = time.monotonic()
                try:
                    state = self._train_round(grid, state, record)
                finally:
                    record.seconds = time.monotonic() - start
                    with self.profile.span("history"):
                        self.run_dir.save_history([asdict(r) for r in self.history])
                self._log_round(record)
                if server_round % self.config.train.save_every_round == 0 or server_round == num_rounds:
                    with self.profile.span("checkpoint"):
                        path = self.run_dir.save_checkpoint(server_round, state, self.peft_config)
                    log.info("Saved the round-%d adapter to %s", server_round, path)
            self.profile.memory()
        return state

    def _train_round(self, grid: Grid, state: dict[str, np.ndarray], record: RoundRecord) -> dict[str, np.ndarray]:
        strategy, profile = self.config.strategy, self.profile
        with profile.span("configure"):
            record.nodes = self._sample_nodes(grid)
            arrays = to_array_record(state)
            content = RecordDict(
                {
                    "arrays": arrays,
                    "config": ConfigRecord({"server-round": record.round, "learning-rate": record.learning_rate}),
                }
            )
            messages = [
                Message(content, dst_node_id=node, message_type=MessageType.TRAIN, ttl=strategy.round_timeout)
                for node in record.nodes
            ]
        with profile.span("send", messages=len(messages)):
            pending = dict(zip(grid.push_messages(messages), record.nodes))
        sent_at = time.perf_counter()
        # Every message carries the whole global adapter; counted per message since payloads may differ.
        message_bytes = arrays.count_bytes()  # one record shared by every message of the round
        for node in record.nodes:
            record.bytes_down += message_bytes
            profile.emit({"kind": "message", "node": node, "direction": "down", "bytes": message_bytes})

        mean = WeightedMean(state)
        losses, weights = [], []
        deadline = time.monotonic() + strategy.round_timeout
        waited, wait_start = 0.0, time.time()
        while pending and time.monotonic() < deadline:
            poll_start = time.perf_counter()
            replies = list(grid.pull_messages(list(pending)))
            if not replies:
                time.sleep(_POLL_SECONDS)
            waited += time.perf_counter() - poll_start
            for reply in replies:
                node = pending.pop(reply.metadata.reply_to_message_id)
                profile.emit(
                    {"kind": "arrival", "node": node, "order": len(record.nodes) - len(pending),
                     "seconds": time.perf_counter() - sent_at}
                )  # fmt: skip
                update = self._accept(reply, node, mean, record)
                if update is not None:
                    losses.append(update[0])
                    weights.append(update[1])
        profile.record_span("wait", waited, wait_start)
        for node in pending.values():
            self._leave_out(record, node, f"no reply within strategy.round-timeout={strategy.round_timeout:g}s")

        if mean.count < strategy.min_train_nodes:
            raise RoundFailed(
                f"round {record.round}: {mean.count} usable update(s), fewer than strategy.min-train-nodes="
                f"{strategy.min_train_nodes}; left out: {record.failures or 'none'}"
            )
        record.train_loss = weighted_average(losses, weights)
        with profile.span("aggregate", step="finalize"):
            return mean.result()

    def _accept(
        self, reply: Message, node: int, mean: WeightedMean, record: RoundRecord
    ) -> tuple[float, float] | None:
        """Fold a reply into ``mean``; return its (loss, weight), or None after logging why it was left out."""
        if reply.has_error():
            self._leave_out(record, node, f"client error {reply.error.code}: {reply.error.reason}")
            return None
        content = reply.content
        if "arrays" not in content or "metrics" not in content:
            self._leave_out(record, node, "reply lacks 'arrays' or 'metrics'")
            return None
        arrays, metrics = content["arrays"], content["metrics"]
        reply_bytes = arrays.count_bytes()
        record.bytes_up += reply_bytes
        for event in events_from_reply(content):
            self.profile.emit({**event, "node": node, "round": record.round})
        self.profile.emit({"kind": "message", "node": node, "direction": "up", "bytes": reply_bytes})
        weight, loss = metrics.get("num-examples", 0), metrics.get("train_loss", float("nan"))
        if not weight > 0 or not np.isfinite(loss):
            self._leave_out(record, node, f"update rejected: num-examples={weight}, train_loss={loss}")
            return None
        with self.profile.span("decode", from_node=node):
            update = from_array_record(arrays)
        try:
            with self.profile.span("aggregate", from_node=node):
                mean.add(update, float(weight))  # checks names, shapes, dtypes and finiteness first
        except ValueError as problem:
            self._leave_out(record, node, f"update rejected: {problem}")
            return None
        record.aggregated.append(node)
        return float(loss), float(weight)

    @staticmethod
    def _leave_out(record: RoundRecord, node: int, reason: str) -> None:
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
        log.info(
            "[round %d/%d] train_loss %.4f | lr %.3g | %d/%d nodes | down %.2f MB, up %.2f MB, total %.2f MB | %.1f s",
            record.round,
            self.config.num_server_rounds,
            record.train_loss,
            record.learning_rate,
            len(record.aggregated),
            len(record.nodes),
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
