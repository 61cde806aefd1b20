"""A run's history: one record per round, as ``history.json`` keeps it and the log reports it.

Nodes are named as federated/roster.py names them (``partition-<i>`` or ``node-<id>``), not by Flower's
random ids, so two runs of one config and seed write the same history but for the seconds.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from flowertune_llm.units import MiB

log = logging.getLogger(f"flwr.{__name__}")

# The FlowerTune leaderboard caps a run's total communication at 200,000 MB (of 2**20 bytes).
COMMUNICATION_BUDGET_MB = 200_000


@dataclass
class RoundRecord:
    round: int
    learning_rate: float
    train_loss: float | None = None  # None in aggregation-only runs
    nodes: list[str] = field(default_factory=list)  # sampled this round
    aggregated: list[str] = field(default_factory=list)  # whose update made it into the mean
    failures: dict[str, str] = field(default_factory=dict)  # node -> why it was left out
    groups: int = 0
    restarts: int = 0  # a node failed after its share was folded: the round restarted without it
    bytes_down: int = 0  # counted by federated/messaging.py, each message in full (evaluation included)
    bytes_up: int = 0
    seconds: float = 0.0
    eval_loss: float | None = None  # the global model's held-out loss after this round, weighted by examples
    eval_examples: int = 0
    eval_nodes: list[str] = field(default_factory=list)  # whose loss is in eval_loss
    eval_failures: dict[str, str] = field(default_factory=dict)

    def leave_out(self, node: str, reason: str, failures: dict[str, str] | None = None) -> None:
        failures = self.failures if failures is None else failures
        if node not in failures:
            failures[node] = reason
            what = "left out" if failures is self.failures else "not evaluated"
            log.warning("Round %d: %s %s: %s", self.round, node, what, reason)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> RoundRecord:
        """A record of a ``history.json`` this version wrote (a resumed run carries its predecessor's)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in entry.items() if key in known})


class History(list[RoundRecord]):
    """The rounds so far, their bytes, and the leaderboard budget warned about once."""

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes_down + r.bytes_up for r in self)

    def as_json(self) -> list[dict[str, Any]]:
        return [asdict(record) for record in self]

    def report(self, record: RoundRecord, num_rounds: int) -> None:
        """The round's line in the ServerApp's log (what `flwr log` shows), and the budget once it is passed."""
        total_mb = self.total_bytes / MiB
        loss = "-" if record.train_loss is None else f"{record.train_loss:.4f}"
        log.info(
            "[round %d/%d] train_loss %s | lr %.3g | %d/%d nodes | %d group(s) | down %.2f MiB, up %.2f MiB, "
            "total %.2f MiB | %.1f s",
            record.round, num_rounds, loss, record.learning_rate, len(record.aggregated), len(record.nodes),
            record.groups, record.bytes_down / MiB, record.bytes_up / MiB, total_mb, record.seconds,
        )  # fmt: skip
        before = (self.total_bytes - record.bytes_down - record.bytes_up) / MiB
        if total_mb > COMMUNICATION_BUDGET_MB >= before:
            log.warning(
                "Communication so far (%.0f MiB) exceeds the FlowerTune leaderboard budget of %d MB",
                total_mb, COMMUNICATION_BUDGET_MB,
            )  # fmt: skip
