"""Each partitioner splits as flwr-datasets' does for the seed; derived labels repeat; refusals name node and key."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from datasets import Dataset, load_dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    LinearPartitioner,
    PathologicalPartitioner,
    ShardPartitioner,
    SquarePartitioner,
)

from flowertune_llm import builtin
from flowertune_llm.config import (
    ConfigError,
    DatasetConfig,
    NodeConfig,
    PartitionConfig,
    default_run_config,
    parse_run_config,
)
from flowertune_llm.config.presets import PRESETS_DIR
from flowertune_llm.training import data, partitions
from flowertune_llm.training.data import format_dataset, load_node_dataset, load_partition

SEED = 7  # not the default 42: a seed that reached only the shuffle, or only the partitioner, would show
SENTIMENTS = ["positive"] * 120 + ["negative"] * 80 + ["neutral"] * 40  # FinGPT-like: `output` is the label
ASKS = ["What is the sentiment of this news?", "Classify the tone of this headline.", "Is this news good or bad?"]


@pytest.fixture(scope="module")
def finance(tmp_path_factory):
    """240 finance records (instruction, input, output = sentiment) in a .jsonl, as a local dataset."""
    path = tmp_path_factory.mktemp("finance") / "sentiment.jsonl"
    records = [{"instruction": ASKS[i % 3], "input": f"Headline number {i} about company {i % 17}.", "output": label}
               for i, label in enumerate(SENTIMENTS)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return DatasetConfig(str(path), "finance")


def partition_config(method: str, by: str = "", alpha: float = 0.5, classes: int = 2, shards: int = 2):
    return PartitionConfig(method, by, alpha, classes, shards)


def flwr_datasets_split(path: str, partitioner, num_partitions: int, seed: int, labels: dict[str, list] | None = None):
    """flwr-datasets' own split of the file, built by hand: its shuffle with the seed, then its partitioner."""
    train = load_dataset("json", data_files=path, split="train").shuffle(seed=seed)
    for name, values in (labels or {}).items():
        train = train.add_column(name, values(train))
    partitioner.dataset = train
    return [partitioner.load_partition(i) for i in range(num_partitions)]


REFERENCES = {  # what a researcher would write with flwr-datasets for the same settings and seed
    "iid": lambda n, by: IidPartitioner(num_partitions=n),
    "dirichlet": lambda n, by: DirichletPartitioner(num_partitions=n, partition_by=by, alpha=0.5, seed=SEED),
    "pathological": lambda n, by: PathologicalPartitioner(
        num_partitions=n, partition_by=by, num_classes_per_partition=2, seed=SEED
    ),
    "shard": lambda n, by: ShardPartitioner(num_partitions=n, partition_by=by, num_shards_per_partition=2, seed=SEED),
    "linear": lambda n, by: LinearPartitioner(num_partitions=n),
    "square": lambda n, by: SquarePartitioner(num_partitions=n),
    "exponential": lambda n, by: ExponentialPartitioner(num_partitions=n),
}


@pytest.mark.parametrize(
    "method, by, num_partitions",
    [("iid", "", 4), ("dirichlet", "output", 4), ("pathological", "output", 4), ("shard", "output", 4),
     ("linear", "", 4), ("square", "", 4), ("exponential", "", 3)],
)  # fmt: skip
def test_each_partitioner_splits_as_flwr_datasets_does_for_the_same_seed(finance, method, by, num_partitions):
    partition = partition_config(method, by)
    expected = flwr_datasets_split(finance.name, REFERENCES[method](num_partitions, by), num_partitions, SEED)
    shares = partitions.node_shares(
        data.federated_dataset(finance, partition, SEED, num_partitions, "output"), num_partitions, "output"
    )
    assert [s.examples for s in shares] == [len(p) for p in expected]
    assert [s.labels for s in shares] == [dict(Counter(p["output"])) for p in expected]
    # The very records, in the order the node trains on them.
    for partition_id, part in enumerate(expected):
        mine = load_partition(finance, partition, SEED, partition_id, num_partitions)
        assert mine["prompt"] == format_dataset(part, finance)["prompt"]


def test_label_skew_is_real_and_the_seed_changes_it(finance):
    dirichlet = partition_config("dirichlet", "output", alpha=0.1)
    mixes = [s.labels for s in partitions.node_shares(data.federated_dataset(finance, dirichlet, SEED, 4), 4, "output")]
    assert any(len(mix) < 3 or min(mix.values()) < 10 for mix in mixes)  # some node lacks a label or nearly
    pathological = partitions.node_shares(
        data.federated_dataset(finance, partition_config("pathological", "output"), SEED, 4), 4, "output"
    )
    assert all(len(s.labels) <= 2 for s in pathological)
    other_seed = partitions.node_shares(data.federated_dataset(finance, dirichlet, SEED + 1, 4), 4, "output")
    assert [s.labels for s in other_seed] != mixes


def _task(train: Dataset) -> list[str]:
    """The built-in set's task type, written independently: its instruction's first word, lower-cased."""
    return [instruction.split()[0].strip("?.,").lower() for instruction in train["instruction"]]


def test_a_derived_label_splits_as_flwr_datasets_does_by_that_label():
    config = DatasetConfig("builtin:instructions", "alpaca")
    partition = partition_config("dirichlet", "@first-word")
    reference = DirichletPartitioner(num_partitions=5, partition_by="task", alpha=0.5, seed=SEED)
    path = str(builtin.dataset_path(config.name))
    expected = flwr_datasets_split(path, reference, 5, SEED, {"task": _task})
    shares = partitions.node_shares(data.federated_dataset(config, partition, SEED, 5), 5, "@first-word")
    assert [s.labels for s in shares] == [dict(Counter(p["task"])) for p in expected]
    assert {label for s in shares for label in s.labels} == {"what", "give", "write", "how", "convert", "sort"}
    assert load_partition(config, partition, SEED, 3, 5)["prompt"] == format_dataset(expected[3], config)["prompt"]


def test_derived_labels_belong_to_the_record_not_to_its_position():
    records = [json.loads(line) for line in builtin.dataset_path("builtin:instructions").read_text().splitlines()]
    dataset = Dataset.from_list(records)
    for name in partitions.DERIVED_LABELS:
        labels = dict(zip(map(json.dumps, records), partitions.derive_labels(name, dataset, "alpaca"), strict=True))
        shuffled = dataset.shuffle(seed=3)
        again = partitions.derive_labels(name, shuffled, "alpaca")
        assert again == [labels[json.dumps(r)] for r in shuffled]  # the same label for a record, in any order
    lengths = {}
    for record, label in zip(records, partitions.derive_labels("@length", dataset, "alpaca"), strict=True):
        lengths.setdefault(label, []).append(len(record["output"]))
    assert sorted(lengths) == ["q1", "q2", "q3", "q4"]
    assert max(lengths["q1"]) < min(lengths["q2"]) and max(lengths["q3"]) < min(lengths["q4"])  # quartiles, in order


def test_first_word_keeps_the_ten_most_common_words_and_folds_the_rest():
    # Words w00..w11 occur 13, 12, ..., 2 times; w10 and w11 fall outside the ten kept. A tie at the cut is broken
    # alphabetically, never by which record came first.
    words = [f"W{i:02d}" for i in range(12) for _ in range(13 - i)] + ["zz", "aa"] * 3
    dataset = Dataset.from_list([{"instruction": f"{w}, please.", "output": ""} for w in words])
    labels = partitions.derive_labels("@first-word", dataset, "alpaca")
    kept = {label for label in labels if label != partitions.OTHER}
    assert kept == {f"w{i:02d}" for i in range(10)}
    medical = Dataset.from_list(
        [{"instruction": "Answer this question truthfully", "input": "Why is bile green?", "output": ""}]
    )
    assert partitions.derive_labels("@first-word", medical, "medical") == ["why"]  # medical asks in `input`


def test_a_node_left_without_examples_is_named_with_the_setting(finance):
    with pytest.raises(ConfigError) as error:
        load_partition(finance, partition_config("exponential"), SEED, 0, 10)
    assert error.value.key == "partition.method" and error.value.value == "exponential"
    # e^1 / sum(e^1..e^10) of 240 examples rounds to none: the first nodes are empty.
    assert re.search(r"partition-0, partition-1, .* of 10 get no examples \(sizes: 0, 0, ", str(error.value))


def test_a_dirichlet_split_that_starves_a_node_names_the_node_and_alpha(finance):
    with pytest.raises(ConfigError) as error:  # 3 labels, alpha 0.01: most of 8 nodes get next to nothing
        load_node_dataset(finance, partition_config("dirichlet", "output", alpha=0.01), SEED,
                          NodeConfig.parse({"partition-id": 0, "num-partitions": 8}))  # fmt: skip
    assert error.value.key == "partition.alpha" and error.value.value == 0.01
    # The nodes named are those flwr-datasets' first draw for the seed leaves short of its minimum of 10.
    first = DirichletPartitioner(num_partitions=8, partition_by="output", alpha=0.01, min_partition_size=0, seed=SEED)
    sizes = [len(p) for p in flwr_datasets_split(finance.name, first, 8, SEED)]
    short = ", ".join(f"partition-{i} got {n}" for i, n in enumerate(sizes) if n < 10)
    assert f"in the first, {short} (sizes: {', '.join(map(str, sizes))});" in str(error.value)


@pytest.mark.parametrize(
    "partition, key, message",
    [
        (partition_config("shard", "output", shards=100), "partition.shards-per-node", "400 shards of 240 examples"),
        (partition_config("pathological", "output", classes=4), "partition.classes-per-node", "more than the 3 label"),
        (partition_config("dirichlet", "sentiment"), "partition.by",
         "no such column or derived label; the data has: instruction, input, output; derived: @first-word, @length"),
        (partition_config("dirichlet", "@topic"), "partition.by", "no such column or derived label"),
        (partition_config("shard", "input"), "partition.by", "240 distinct values in 240 records: free text or an id"),
    ],
)  # fmt: skip
def test_a_setting_the_partitioner_cannot_meet_names_the_key(finance, partition, key, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_partition(finance, partition, SEED, 0, 4)
    assert error.value.key == key and "\n" not in str(error.value)


def test_the_run_log_line_says_whether_the_split_is_the_leaderboards():
    assert partitions.describe_partitioning(partition_config("iid")) == "IID (as the FlowerTune leaderboard requires)"
    assert (partitions.describe_partitioning(partition_config("dirichlet", "output"))
            == "non-IID: dirichlet by output, alpha=0.5 (research runs; the leaderboard is IID)")  # fmt: skip
    for method, detail in [("pathological", "pathological by @first-word, 2 label(s) per node"),
                           ("shard", "shard by @first-word, 2 shard(s) per node"),
                           ("exponential", "exponential sizes (the i-th node's share grows as e^i)")]:  # fmt: skip
        line = partitions.describe_partitioning(partition_config(method, "@first-word"))
        assert line == f"non-IID: {detail} (research runs; the leaderboard is IID)"


def test_every_preset_stays_iid():
    names = [str(p.relative_to(PRESETS_DIR).with_suffix("")) for p in PRESETS_DIR.rglob("*.toml")]
    assert len(names) >= 10
    for name in names:
        config = parse_run_config({**default_run_config(), "preset": name})
        assert config.partition.method == "iid", name
        assert partitions.describe_partitioning(config.partition) == partitions.LEADERBOARD_IID
