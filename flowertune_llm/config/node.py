"""A SuperNode's own settings (``--node-config``), parsed once per message into one validated object.

The Simulation Engine sets ``partition-id`` and ``num-partitions``; a data owner in the Deployment Engine
sets what fits the node (its own data file, its copy of the model, where its state goes). Every key is a
field below; an unknown key, a value of the wrong type or one out of range raises :class:`NodeConfigError`
naming the key, which the node reports to the server as the reason it was left out of the round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowertune_llm.config.errors import NodeConfigError
from flowertune_llm.config.run import DATASET_FORMATS

# A node's own data file, by suffix: the `datasets` loader that reads it.
LOCAL_DATA_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


@dataclass(frozen=True)
class NodeConfig:
    """What a node was started with. Keys are the fields with ``-`` for ``_``."""

    partition_id: int | None = None  # this node's IID share of static.dataset.name ...
    num_partitions: int | None = None  # ... out of this many
    dataset_path: Path | None = None  # the node's own data file (.json, .jsonl, .parquet, .csv), used whole
    dataset_format: str | None = None  # its prompt format; default: the run's static.dataset.format
    model_path: Path | None = None  # aggregation-only runs of a whole model: this node's copy of it
    aggregation_weight: float = 1.0  # aggregation-only runs: this node's FedAvg weight
    state_dir: Path | None = None  # where a round's weights wait between messages (default: the package cache)
    persistent_worker: bool | None = None  # keep the model loaded in a worker; default: outside simulation

    def __post_init__(self) -> None:
        if self.num_partitions is not None and self.num_partitions < 1:
            raise NodeConfigError(f"node config num-partitions={self.num_partitions}: must be >= 1")
        if self.partition_id is not None and self.num_partitions is not None:
            if not 0 <= self.partition_id < self.num_partitions:
                raise NodeConfigError(
                    f"node config partition-id={self.partition_id} is outside 0..{self.num_partitions - 1}"
                )
        if self.dataset_format is not None and self.dataset_format not in DATASET_FORMATS:
            raise NodeConfigError(
                f"node config dataset-format='{self.dataset_format}': allowed: {', '.join(DATASET_FORMATS)}"
            )
        if self.dataset_path is not None and self.dataset_path.suffix not in LOCAL_DATA_FORMATS:
            raise NodeConfigError(
                f"node config dataset-path='{self.dataset_path}': allowed suffixes: {', '.join(LOCAL_DATA_FORMATS)}"
            )
        if not self.aggregation_weight > 0:
            raise NodeConfigError(f"node config aggregation-weight={self.aggregation_weight}: must be > 0")

    @classmethod
    def parse(cls, node_config: Mapping[str, Any]) -> NodeConfig:
        """From Flower's ``context.node_config`` (values as the command line gave them: strings or numbers)."""
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in node_config.items():
            if key not in fields:
                raise NodeConfigError(f"node config {key}={value!r}: unknown key; allowed: {', '.join(fields)}")
            values[fields[key].name] = _convert(key, value, fields[key].type)
        return cls(**values)

    def name(self, node_id: int) -> str:
        """The node's name across runs (federated/roster.py): its partition, else its Flower node id."""
        return f"partition-{self.partition_id}" if self.partition_id is not None else f"node-{node_id}"

    def partition(self) -> tuple[int, int]:
        """``(partition-id, num-partitions)``, or an error naming what is missing."""
        for key, value in (("partition-id", self.partition_id), ("num-partitions", self.num_partitions)):
            if value is None:
                raise NodeConfigError(
                    f"node config lacks '{key}': set it with --node-config \"partition-id=0 num-partitions=2\", "
                    "or name the node's own data with --node-config \"dataset-path='/data/train.jsonl'\""
                )
        return self.partition_id, self.num_partitions  # type: ignore[return-value]


def _convert(key: str, value: Any, kind: str) -> Any:
    try:
        if "Path" in kind:
            return Path(str(value)).expanduser().resolve()
        if "bool" in kind:
            text = str(value).lower()
            if text not in _TRUE + _FALSE:
                raise ValueError(value)
            return text in _TRUE
        if "int" in kind:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in kind:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        expected = kind.split(" | ")[0]
        raise NodeConfigError(f"node config {key}={value!r}: expected {expected}") from None
