"""Non-IID partitions for research runs: flwr-datasets' partitioners, labels derived from records, and checks.

The FlowerTune leaderboard splits each challenge's data IID among the nodes, and ``partition.method='iid'``
stays the default (every preset keeps it). Research on heterogeneity needs the splits flwr-datasets ships:
label skew (``dirichlet``, ``pathological``, ``shard``) and size skew (``linear``, ``square``, ``exponential``).

The partitioners are flwr-datasets' own, with its defaults for everything the run config does not set,
after flwr-datasets' own shuffle, both seeded with ``train.seed``: a split here is exactly the split
flwr-datasets gives for that seed, record for record (tests/training/test_partitions.py).

Instruction datasets rarely carry a label column, so ``partition.by`` may also name a label derived from
each record (``DERIVED_LABELS``). A derived label depends only on the record and on statistics of the whole
training split, never on the order of the records, so every node and every seed derives the same labels.

A split that leaves a node without examples, or that the partitioner refuses, is one ``ConfigError`` naming
the node and the key, raised when a node first builds the split (``split_sizes``; once per process),
before it trains. ``flowertune-llm partitions`` shows every node's share before anything runs.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    LinearPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
    SquarePartitioner,
)

from flowertune_llm.config import ConfigError, PartitionConfig
from flowertune_llm.config.run import LABEL_SKEWED

SPLIT = "train"  # the split FederatedDataset partitions; every FlowerTune dataset trains on its "train"

# @first-word keeps the most common words and folds the rest into OTHER: Alpaca-style data has a long tail
# of one-example first words (147 distinct among alpaca_en_demo's 999 instructions, 51% of them in the top
# 10), which would hand the pathological and shard partitioners hundreds of near-empty labels.
FIRST_WORDS_KEPT = 10
OTHER = "(other)"  # parentheses: never a word, so never a kept first word
NO_WORD = "(none)"
# A column with more distinct values than this, or with fewer than 2 records per value on average, is an id
# or free text (Alpaca's `output`: one value per record; the built-in set's: 381 in 700), not a label. The
# Dirichlet partitioner's loop over labels also costs labels x records.
MAX_LABELS = 1000

DERIVED_LABELS = {
    "@first-word": "the lower-cased first word of the instruction (of `input` in the medical format, whose "
    f"instruction is the same for every record): the task type in Alpaca-style data; the {FIRST_WORDS_KEPT} "
    f"most common words across the training split keep their name, the rest are '{OTHER}'",
    "@length": "the quartile of the response's (`output`) length in characters across the training split: "
    "q1 (up to the first quartile) to q4 (above the third)",
}

# flwr-datasets' default min_partition_size, kept so that a split is the one its Dirichlet partitioner gives
# by default; it redraws (up to 11 draws in all) until every node has this many examples.
MIN_DIRICHLET_SIZE = 10

LEADERBOARD_IID = "IID (as the FlowerTune leaderboard requires)"
RESEARCH_NOTE = "(research runs; the leaderboard is IID)"
SIZE_SKEW = {"linear": "i", "square": "i^2", "exponential": "e^i"}  # node i (1..N) holds a share proportional to


def describe_partitioning(partition: PartitionConfig) -> str:
    """The partitioning in one line, for the server's run log: whether it is the leaderboard's IID split."""
    method = partition.method
    if method == "iid":
        return LEADERBOARD_IID
    if method == "dirichlet":
        detail = f"dirichlet by {partition.by}, alpha={partition.alpha:g}"
    elif method == "pathological":
        detail = f"pathological by {partition.by}, {partition.classes_per_node} label(s) per node"
    elif method == "shard":
        detail = f"shard by {partition.by}, {partition.shards_per_node} shard(s) per node"
    else:
        detail = f"{method} sizes (the i-th node's share grows as {SIZE_SKEW[method]})"
    return f"non-IID: {detail} {RESEARCH_NOTE}"


def partitioner(partition: PartitionConfig, num_partitions: int, seed: int) -> Partitioner:
    """flwr-datasets' partitioner for ``partition``, seeded with ``seed`` (``train.seed``) where it draws.

    IID and the size-skewed partitioners draw nothing themselves: they cut the dataset as FederatedDataset's
    shuffle (seeded with the same seed) left it.
    """
    method, by = partition.method, partition.by
    if method == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if method == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by=by, alpha=partition.alpha,
                                    min_partition_size=MIN_DIRICHLET_SIZE, seed=seed)  # fmt: skip
    if method == "pathological":
        return PathologicalPartitioner(num_partitions=num_partitions, partition_by=by,
                                       num_classes_per_partition=partition.classes_per_node, seed=seed)  # fmt: skip
    if method == "shard":
        return ShardPartitioner(num_partitions=num_partitions, partition_by=by,
                                num_shards_per_partition=partition.shards_per_node, seed=seed)  # fmt: skip
    sized = {"linear": LinearPartitioner, "square": SquarePartitioner, "exponential": ExponentialPartitioner}
    return sized[method](num_partitions=num_partitions)


# --- labels ---------------------------------------------------------------------------------------------------


def label_column(partition: PartitionConfig) -> str:
    """The column the partitioner splits by, or "" for a method that needs no labels."""
    return partition.by if partition.method in LABEL_SKEWED else ""


def label_problem(name: str, columns: Sequence[str]) -> str | None:
    """Why ``name`` cannot label the records (neither a column nor a derived label), else None."""
    if name in DERIVED_LABELS or (name in columns and not name.startswith("@")):
        return None
    return (f"no such column or derived label; the data has: {', '.join(c for c in columns if not c.startswith('@'))}; "
            f"derived: {', '.join(DERIVED_LABELS)}")  # fmt: skip


def question_column(format_name: str) -> str:
    """Where a record's instruction is: medical flashcards carry a constant instruction and ask in `input`."""
    return "input" if format_name == "medical" else "instruction"


def _first_word(text: str | None) -> str:
    match = re.search(r"\w+", text or "")
    return match.group(0).lower() if match else NO_WORD


def derive_labels(name: str, dataset: Dataset, format_name: str) -> list[str]:
    """One label per record of ``dataset`` (the whole training split), in its order. See ``DERIVED_LABELS``."""
    if name == "@first-word":
        words = [_first_word(text) for text in dataset[question_column(format_name)]]
        # Most common first, ties alphabetically: never by first occurrence, which the shuffle's seed decides.
        ranked = sorted(Counter(words).items(), key=lambda item: (-item[1], item[0]))
        kept = {word for word, _ in ranked[:FIRST_WORDS_KEPT]}
        return [word if word in kept else OTHER for word in words]
    if name == "@length":
        lengths = np.array([len(text or "") for text in dataset["output"]])
        quartiles = np.quantile(lengths, [0.25, 0.5, 0.75])
        return [f"q{bucket + 1}" for bucket in np.searchsorted(quartiles, lengths, side="left")]
    raise ValueError(f"no derived label {name!r}; derived: {', '.join(DERIVED_LABELS)}")


def label_adder(names: Sequence[str], format_name: str) -> Callable[[DatasetDict], DatasetDict]:
    """A FederatedDataset preprocessor: the derived labels among ``names`` as columns of the training split.

    The column is named after the label (``@first-word``): no dataset's own column starts with ``@``, and
    formatting drops every column, this one too.
    """
    derived = [name for name in names if name in DERIVED_LABELS]

    def add(splits: DatasetDict) -> DatasetDict:
        train = splits[SPLIT]
        for name in derived:
            train = train.add_column(name, derive_labels(name, train, format_name))
        splits[SPLIT] = train
        return splits

    return add


def labels_problem(train: Dataset, name: str) -> str | None:
    """Why ``name`` cannot label the records of ``train`` (derived labels already added), else None."""
    problem = label_problem(name, train.column_names)
    if problem:
        return problem
    try:
        labels = len(train.unique(name))
    except Exception as error:  # noqa: BLE001 - pyarrow's errors for values that cannot be compared
        return f"its values cannot serve as labels ({type(error).__name__})"
    if labels > min(MAX_LABELS, len(train) / 2):
        return (f"{labels} distinct values in {len(train)} records: free text or an id, not a label (at most "
                f"{MAX_LABELS}, with 2 or more records each on average); "
                f"derived: {', '.join(DERIVED_LABELS)}")  # fmt: skip
    return None


def _check_labels(train: Dataset, partition: PartitionConfig, num_partitions: int) -> None:
    """The label-skewed methods' refusals that can be named before partitioning, each naming its key."""
    by = partition.by
    problem = labels_problem(train, by)
    if problem:
        raise ConfigError("partition.by", by, problem)
    labels = len(train.unique(by))  # arrow's unique: milliseconds, and labels_problem just read the column
    if partition.method == "pathological" and partition.classes_per_node > labels:
        raise ConfigError("partition.classes-per-node", partition.classes_per_node,
                          f"more than the {labels} label(s) of partition.by='{by}'")  # fmt: skip
    shards = num_partitions * partition.shards_per_node
    if partition.method == "shard" and shards > len(train):
        raise ConfigError("partition.shards-per-node", partition.shards_per_node,
                          f"{num_partitions} nodes x {partition.shards_per_node} = {shards} shards of "
                          f"{len(train)} examples leaves shards, and so nodes, empty")  # fmt: skip


# --- sizes and the empty-node check ---------------------------------------------------------------------------


def _sizes_text(sizes: Sequence[int], shown: int = 12) -> str:
    text = ", ".join(map(str, sizes[:shown]))
    return text + (f", ... ({len(sizes)} nodes)" if len(sizes) > shown else "")


def _empty_nodes(sizes: Sequence[int], key: str, value: object, advice: str) -> ConfigError:
    empty = [i for i, size in enumerate(sizes) if size == 0]
    nodes = ", ".join(f"partition-{i}" for i in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    verb = "gets" if len(empty) == 1 else "get"
    return ConfigError(
        key, value, f"{nodes} of {len(sizes)} {verb} no examples (sizes: {_sizes_text(sizes)}); {advice}"
    )


def _refusal(error: ValueError, federated: FederatedDataset, partition: PartitionConfig, num_partitions: int,
             seed: int) -> ConfigError:  # fmt: skip
    """flwr-datasets' refusal of a split as one line naming the key (and the nodes, where they are known)."""
    used = federated.partitioners[SPLIT]
    fewer = f"or fewer nodes than num-partitions={num_partitions}"
    if isinstance(used, (LinearPartitioner, SquarePartitioner, ExponentialPartitioner)):
        # The sizes are computed before flwr-datasets checks them, so the empty nodes can be named.
        sizes = [int(used.partition_id_to_size[i]) for i in range(num_partitions)]
        return _empty_nodes(sizes, "partition.method", partition.method, f"use linear or square sizes, {fewer}")
    if isinstance(used, DirichletPartitioner):
        # flwr-datasets redraws until every node has min_partition_size examples and gives up after 11 draws;
        # its first draw, which the same seed repeats with no minimum, shows which nodes fell short.
        first = DirichletPartitioner(num_partitions=num_partitions, partition_by=partition.by,
                                     alpha=partition.alpha, min_partition_size=0, seed=seed)  # fmt: skip
        first.dataset = federated.load_split(SPLIT)
        sizes = [len(first.load_partition(i)) for i in range(num_partitions)]
        short = [f"partition-{i} got {size}" for i, size in enumerate(sizes) if size < MIN_DIRICHLET_SIZE]
        short = ", ".join(short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")  # one line, short
        return ConfigError("partition.alpha", partition.alpha,
                           f"11 Dirichlet draws by '{partition.by}' each left some node with fewer than "
                           f"{MIN_DIRICHLET_SIZE} examples (flwr-datasets' min_partition_size); in the first, {short} "
                           f"(sizes: {_sizes_text(sizes)}); raise partition.alpha, {fewer}")  # fmt: skip
    reason = str(error).split(". ")[0].replace("\n", " ")
    key, value = ("partition.classes-per-node", partition.classes_per_node) if isinstance(
        used, PathologicalPartitioner) else ("partition.method", partition.method)  # fmt: skip
    return ConfigError(key, value, f"flwr-datasets' {type(used).__name__} refuses the split: {reason}")


def split_sizes(federated: FederatedDataset, partition: PartitionConfig, num_partitions: int, seed: int) -> list[int]:
    """Every node's number of examples; a ``ConfigError`` naming the node and the key if one would get none.

    Computing one node's partition computes them all (flwr-datasets assigns every index at once), so checking
    every node costs one ``select`` per node on top of what the node's own partition costs anyway. Measured on
    52,000 Alpaca-style records and 20 nodes (2-core CPU): 0.25 s for IID, 0.8 s (shard by @length) to 1.8 s
    (dirichlet or pathological by @first-word) with the derived label, once per process.
    """
    train = federated.load_split(SPLIT)
    if partition.method in LABEL_SKEWED:
        _check_labels(train, partition, num_partitions)
    try:
        sizes = [len(federated.load_partition(i, SPLIT)) for i in range(num_partitions)]
    except ValueError as error:
        raise _refusal(error, federated, partition, num_partitions, seed) from None
    if 0 in sizes:
        key, value = {"dirichlet": ("partition.alpha", partition.alpha),
                      "shard": ("partition.shards-per-node", partition.shards_per_node)}.get(
            partition.method, ("partition.method", partition.method))  # fmt: skip
        raise _empty_nodes(
            sizes, key, value, f"use fewer nodes than num-partitions={num_partitions} or another setting"
        )
    return sizes


# --- what each node holds -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeShare:
    """One node's partition: how many examples, and how many of each label (most common first)."""

    partition_id: int
    examples: int
    labels: dict[str, int]

    @property
    def node(self) -> str:
        return f"partition-{self.partition_id}"  # the node's name in the run log and history.json (roster.py)


def node_shares(federated: FederatedDataset, num_partitions: int, labels: str) -> list[NodeShare]:
    """Every node's size and label mix; ``labels`` names a column of the training split (derived ones added)."""
    shares = []
    for partition_id in range(num_partitions):
        part = federated.load_partition(partition_id, SPLIT)
        counts = Counter(str(value) for value in part[labels])
        ranked = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
        shares.append(NodeShare(partition_id, len(part), ranked))
    return shares


def plot(shares: Sequence[NodeShare], title: str, labels: str, path: Path, kept: int = 12) -> Path:
    """A stacked bar per node: its examples by label; beyond the ``kept`` most common labels, one "other" bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = Counter()
    for share in shares:
        totals.update(share.labels)
    ranked = [label for label, _ in sorted(totals.items(), key=lambda item: (-item[1], item[0]))]
    shown = ranked[:kept]
    colors = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(figsize=(max(7.5, 0.45 * len(shares) + 3), 4.5), dpi=110)
    positions = np.arange(len(shares))
    bottom = np.zeros(len(shares))
    stacks = [(label, [share.labels.get(label, 0) for share in shares]) for label in shown]
    if len(ranked) > kept:
        rest = [sum(n for label, n in share.labels.items() if label not in shown) for share in shares]
        stacks.append((f"{len(ranked) - kept} other labels", rest))
    for index, (label, heights) in enumerate(stacks):
        axes.bar(positions, heights, bottom=bottom, color=colors[index % len(colors)], label=label, width=0.8)
        bottom += heights
    axes.set_xticks(positions, [str(share.partition_id) for share in shares], fontsize=7)
    axes.set_xlabel("partition (node partition-i)")
    axes.set_ylabel("examples")
    axes.set_title(textwrap.fill(title, 80), fontsize=8)  # a long dataset path and description: wrapped, not cut
    axes.legend(title=labels, fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
