"""Instruction data: federated partitions (training/partitions.py) and one prompt formatter per FlowerTune challenge.

Each formatter turns a record into ``prompt`` and ``completion``; TRL's SFTTrainer then puts the loss on
the completion only. The prompts follow the FlowerTune leaderboard's training templates (templates.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset
from flwr_datasets import FederatedDataset

from flowertune_llm import builtin
from flowertune_llm.config import ConfigError, DatasetConfig, NodeConfig, NodeConfigError, PartitionConfig
from flowertune_llm.config.node import LOCAL_DATA_FORMATS
from flowertune_llm.training import partitions
from flowertune_llm.training.templates import alpaca_prompt, flowertune_prompt

Record = dict[str, Any]


@dataclass(frozen=True)
class PromptFormat:
    required_columns: tuple[str, ...]
    to_prompt: Callable[[Record], str]
    response_prefix: str = " "  # the leaderboard prompt ends at "### Response:"; the answer follows a space


FORMATS: dict[str, PromptFormat] = {
    # General NLP drops Alpaca's `input`, as the leaderboard does.
    "general-nlp": PromptFormat(("instruction", "output"), lambda r: flowertune_prompt(r["instruction"])),
    "finance": PromptFormat(
        ("instruction", "input", "output"), lambda r: flowertune_prompt(f"{r['instruction']} {r['input']}")
    ),
    # Medical flashcards carry a constant instruction; the question is in `input`.
    "medical": PromptFormat(("input", "output"), lambda r: flowertune_prompt(r["input"])),
    "code": PromptFormat(
        ("instruction", "input", "output"), lambda r: flowertune_prompt(f"{r['instruction']} {r['input']}")
    ),
    "alpaca": PromptFormat(
        ("instruction", "input", "output"),
        lambda r: alpaca_prompt(r["instruction"], r["input"] or ""),
        response_prefix="",
    ),
}


def format_record(record: Record, format_name: str) -> dict[str, str]:
    prompt_format = FORMATS[format_name]
    return {"prompt": prompt_format.to_prompt(record), "completion": prompt_format.response_prefix + record["output"]}


def check_columns(columns: list[str], config: DatasetConfig) -> None:
    missing = [c for c in FORMATS[config.format].required_columns if c not in columns]
    if missing:
        raise ConfigError(
            "static.dataset.name",
            config.name,
            f"format '{config.format}' needs columns {', '.join(missing)}, which the data lacks "
            f"(it has: {', '.join(columns)})",
        )


def format_dataset(dataset: Dataset, config: DatasetConfig) -> Dataset:
    check_columns(dataset.column_names, config)
    return dataset.map(
        format_record, fn_kwargs={"format_name": config.format}, remove_columns=dataset.column_names
    )


def local_file(name: str) -> Path | None:
    """The file behind ``static.dataset.name`` when it names one (built-in or by suffix), else None (a Hub id)."""
    if builtin.is_builtin(name):
        return builtin.dataset_path(name)
    path = Path(name).expanduser()
    return path.resolve() if path.suffix in LOCAL_DATA_FORMATS else None


def _load_dataset_kwargs(config: DatasetConfig) -> dict[str, Any]:
    path = local_file(config.name)
    if path is None:
        return {"dataset": config.name}
    if not path.is_file():
        raise ConfigError("static.dataset.name", config.name, f"no such file: {path}")
    return {"dataset": LOCAL_DATA_FORMATS[path.suffix], "data_files": str(path)}


class DataFileError(ValueError):
    """A local data file that cannot be read; the message names the file and, for JSON lines, the line."""


def _load_local(path: Path) -> Dataset:
    """A local data file through its `datasets` loader (chosen by suffix), or one line saying what is wrong."""
    try:
        dataset = load_dataset(LOCAL_DATA_FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # noqa: BLE001 - pyarrow's and datasets' many errors, named by file
        raise DataFileError(f"{path}: {_what_is_wrong(path, error)}") from None
    if len(dataset) == 0:
        raise DataFileError(f"{path}: no examples")
    return dataset


def _what_is_wrong(path: Path, error: Exception) -> str:
    """The first bad line of a JSON-lines file (1-based, as editors count), else the loader's own message."""
    if path.suffix == ".jsonl":
        rows = 0
        with path.open(errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    rows += 1
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as bad:
                        return f"line {number} is not valid JSON ({bad.msg})"
        if rows == 0:
            return "no examples (no line holds one)"
    if path.stat().st_size == 0:
        return "no examples (the file is empty)"
    return f"cannot be read as {LOCAL_DATA_FORMATS[path.suffix]} ({type(error).__name__}: {str(error).splitlines()[0][:200]})"


def check_local_dataset(config: DatasetConfig) -> None:
    """For a local file, fail on a missing, empty or unreadable file or missing columns before any training starts.

    The whole file is read (datasets caches it, so the nodes of a simulation then load it from the cache):
    a bad line 61 is found here, not inside a client's round.
    """
    if "data_files" in _load_dataset_kwargs(config):  # raises on a missing file
        try:
            columns = _load_local(local_file(config.name)).column_names
        except DataFileError as error:
            raise ConfigError("static.dataset.name", config.name, str(error)) from None
        check_columns(columns, config)


# Keyed by everything the split depends on: the data, the partitioning, the seed, the number of nodes, and the
# derived label columns added to it (the CLI adds one to show; training adds only what the partitioner needs).
_federated: dict[tuple[DatasetConfig, PartitionConfig, int, int, tuple[str, ...]], FederatedDataset] = {}
_partitions: dict[tuple[DatasetConfig, PartitionConfig, int, int, int], Dataset] = {}


def federated_dataset(
    config: DatasetConfig, partition: PartitionConfig, seed: int, num_partitions: int, shown_labels: str = ""
) -> FederatedDataset:
    """``static.dataset.name`` split among ``num_partitions`` nodes as ``partition.*`` says, seeded with ``seed``.

    Checked once when built (cached for the life of the process): every node gets at least one example, or a
    ``ConfigError`` names the node and the key (training/partitions.py). ``shown_labels`` adds a derived label
    column for ``flowertune-llm partitions`` to count; an added column changes no node's share.
    """
    derived = tuple(sorted({partitions.label_column(partition), shown_labels} & set(partitions.DERIVED_LABELS)))
    key = (config, partition, seed, num_partitions, derived)
    if key not in _federated:
        add_labels = partitions.label_adder(derived, config.format)

        def prepare(splits: DatasetDict) -> DatasetDict:  # after flwr-datasets' shuffle, before partitioning
            check_columns(splits[partitions.SPLIT].column_names, config)  # what derived labels read
            return add_labels(splits)

        federated = FederatedDataset(
            partitioners={partitions.SPLIT: partitions.partitioner(partition, num_partitions, seed)},
            preprocessor=prepare if derived else None, seed=seed, **_load_dataset_kwargs(config),
        )  # fmt: skip
        examples = len(federated.load_split(partitions.SPLIT))
        if examples < num_partitions:
            raise ConfigError("static.dataset.name", config.name,
                              f"{examples} example(s), fewer than the {num_partitions} partitions (num-partitions) "
                              "it is split into: every node needs at least one")  # fmt: skip
        partitions.split_sizes(federated, partition, num_partitions, seed)
        _federated[key] = federated
    return _federated[key]


def load_partition(
    config: DatasetConfig, partition: PartitionConfig, seed: int, partition_id: int, num_partitions: int
) -> Dataset:
    """This node's share of the training split (``partition.*``: IID by default), formatted; cached per process."""
    key = (config, partition, seed, partition_id, num_partitions)
    if key not in _partitions:
        federated = federated_dataset(config, partition, seed, num_partitions)
        _partitions[key] = format_dataset(federated.load_partition(partition_id, partitions.SPLIT), config)
    return _partitions[key]


_local: dict[tuple[str, str], Dataset] = {}


def load_node_dataset(config: DatasetConfig, partition: PartitionConfig, seed: int, node: NodeConfig) -> Dataset:
    """The data this node trains on, formatted.

    A data owner's own file (``dataset-path``, optionally ``dataset-format``, in the node config) is used
    whole; without one the node takes its partition of ``static.dataset.name`` (``partition.*``, seeded with
    ``seed``, the run's ``train.seed``).
    """
    if node.dataset_path is None:
        return load_partition(config, partition, seed, *node.partition())
    path, format_name = node.dataset_path, node.dataset_format or config.format
    if not path.is_file():
        raise NodeConfigError(f"node config dataset-path='{path}': no such file")
    key = (str(path), format_name)
    if key not in _local:
        _local[key] = format_dataset(_load_local(path), DatasetConfig(str(path), format_name))
    return _local[key]


_splits: dict[tuple[int, float, int], tuple[Dataset, tuple[Dataset, Dataset]]] = {}


def split_held_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(train, held out)``: ``fraction`` of a node's data, drawn once with the run's seed and never trained on.

    The same for every round and every process of the node (the split is seeded), and kept for the life of
    the process, so training and evaluation reuse their tokenized sets.
    """
    key = (id(dataset), fraction, seed)
    if key not in _splits or _splits[key][0] is not dataset:
        held = math.ceil(len(dataset) * fraction)
        if held < 1 or len(dataset) - held < 1:
            raise ValueError(
                f"eval.fraction={fraction} of this node's {len(dataset)} examples leaves "
                f"{held} to evaluate and {len(dataset) - held} to train: both need at least one"
            )
        parts = dataset.train_test_split(test_size=held, seed=seed, shuffle=True)
        _splits[key] = (dataset, (parts["train"], parts["test"]))
    return _splits[key][1]
