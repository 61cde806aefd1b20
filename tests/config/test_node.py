"""A SuperNode's ``--node-config``: parsed once into one object, every mistake named by its key."""

from pathlib import Path

import pytest

from flowertune_llm.config import NodeConfig, NodeConfigError


def test_simulation_gives_a_partition_and_the_rest_keeps_its_defaults():
    node = NodeConfig.parse({"partition-id": "1", "num-partitions": 4})  # Flower passes strings in simulation
    assert node.partition() == (1, 4)
    assert node == NodeConfig(partition_id=1, num_partitions=4)
    assert (node.dataset_path, node.model_path, node.state_dir, node.persistent_worker) == (None, None, None, None)
    assert node.aggregation_weight == 1.0


def test_a_data_owners_node_config_is_typed_and_its_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    node = NodeConfig.parse({"dataset-path": "data/clinic.jsonl", "dataset-format": "medical", "aggregation-weight": 3,
                             "model-path": "~/models/llama", "state-dir": "state", "persistent-worker": "false"})  # fmt: skip
    assert node.dataset_path == tmp_path / "data" / "clinic.jsonl" and node.dataset_format == "medical"
    assert node.model_path == Path("~/models/llama").expanduser() and node.state_dir == tmp_path / "state"
    assert node.aggregation_weight == 3.0 and node.persistent_worker is False


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("yes", True), (True, True),
                                             ("false", False), ("0", False), (False, False)])  # fmt: skip
def test_persistent_worker_reads_the_usual_spellings(value, expected):
    assert NodeConfig.parse({"persistent-worker": value}).persistent_worker is expected


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({"partition-id": 2, "num-partitions": 2}, "partition-id=2 is outside 0..1"),
        ({"num-partitions": 0}, "num-partitions=0: must be >= 1"),
        ({"partition-id": "first"}, "partition-id='first': expected int"),
        ({"partition-id": 1.5}, "partition-id=1.5: expected int"),
        ({"dataset-path": "/data/notes.txt"}, "dataset-path='/data/notes.txt': allowed suffixes: .json, .jsonl"),
        ({"dataset-format": "poetry"}, "dataset-format='poetry': allowed: general-nlp, finance"),
        ({"aggregation-weight": 0}, "aggregation-weight=0.0: must be > 0"),
        ({"aggregation-weight": "heavy"}, "aggregation-weight='heavy': expected float"),
        ({"persistent-worker": "maybe"}, "persistent-worker='maybe': expected bool"),
        ({"dataset_path": "/data/x.jsonl"}, "dataset_path='/data/x.jsonl': unknown key; allowed: partition-id"),
    ],
)
def test_a_node_config_that_cannot_work_names_the_key(node_config, message):
    with pytest.raises(NodeConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        NodeConfig.parse(node_config)


def test_a_missing_partition_key_is_named_with_both_ways_out():
    with pytest.raises(NodeConfigError, match="lacks 'num-partitions'.*dataset-path="):
        NodeConfig.parse({"partition-id": 1}).partition()
