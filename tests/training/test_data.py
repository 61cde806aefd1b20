"""Formatters follow the leaderboard protocol; local files load and partition; bad data names what is missing."""

import json

import pytest
from datasets import Dataset

from flowertune_llm.config import ConfigError, DatasetConfig, NodeConfig, NodeConfigError, PartitionConfig
from flowertune_llm.training.data import (
    check_local_dataset,
    format_dataset,
    load_node_dataset,
    load_partition,
    split_held_out,
)
from flowertune_llm.training.templates import ALPACA_PREAMBLE

# The defaults: the leaderboard's IID split, seeded with train.seed (non-IID splits: test_partitions.py).
IID, SEED = PartitionConfig("iid", "", 0.5, 2, 2), 42

# One record shaped like each challenge's training set (same columns, similar content, our own words).
ALPACA_GPT4 = {"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color.", "text": "..."}
FINGPT = {
    "input": "Shares of the company rose 5% after strong earnings.",
    "output": "positive",
    "instruction": "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
}
MEDICAL = {
    "instruction": "Answer this question truthfully",
    "input": "What does the liver produce to help digest fat?",
    "output": "The liver produces bile.",
}
CODE = {"instruction": "Write a function that doubles a number.", "input": "x = 4", "output": "def double(x):\n    return 2 * x"}


def _formatted(record, format_name):
    return format_dataset(Dataset.from_list([record]), DatasetConfig("local.jsonl", format_name))[0]


def _leaderboard_prompt(instruction):
    return f"{ALPACA_PREAMBLE}\n### Instruction:\n{instruction}\n### Response:"


def test_general_nlp_drops_the_input():
    row = _formatted({**ALPACA_GPT4, "input": "ignored context"}, "general-nlp")
    assert row == {"prompt": _leaderboard_prompt("Name a primary color."), "completion": " Red is a primary color."}


def test_finance_appends_the_input_to_the_instruction():
    row = _formatted(FINGPT, "finance")
    assert row["prompt"] == _leaderboard_prompt(f"{FINGPT['instruction']} {FINGPT['input']}")
    assert row["completion"] == " positive"


def test_medical_uses_the_question_and_drops_the_constant_instruction():
    row = _formatted(MEDICAL, "medical")
    assert row["prompt"] == _leaderboard_prompt("What does the liver produce to help digest fat?")
    assert "truthfully" not in row["prompt"]


def test_code_appends_the_input_to_the_instruction():
    row = _formatted(CODE, "code")
    assert row["prompt"] == _leaderboard_prompt("Write a function that doubles a number. x = 4")
    assert row["completion"] == " def double(x):\n    return 2 * x"


def test_plain_alpaca_has_an_input_block_only_when_there_is_input():
    with_input = _formatted(CODE, "alpaca")
    assert "### Input:\nx = 4\n\n### Response:\n" in with_input["prompt"]
    assert with_input["completion"] == CODE["output"]
    without = _formatted(ALPACA_GPT4, "alpaca")
    assert "### Input:" not in without["prompt"] and without["prompt"].endswith("### Response:\n")


def test_only_prompt_and_completion_remain():
    assert set(_formatted(ALPACA_GPT4, "general-nlp")) == {"prompt", "completion"}


@pytest.mark.parametrize(
    "record, format_name, missing",
    [
        ({"question": "q", "answer": "a"}, "general-nlp", "instruction, output"),
        ({"instruction": "i", "output": "o"}, "finance", "input"),
        ({"instruction": "i", "output": "o"}, "medical", "input"),
        ({"prompt": "p", "output": "o"}, "code", "instruction, input"),
    ],
)
def test_data_that_does_not_fit_the_format_names_the_missing_columns(record, format_name, missing):
    with pytest.raises(ConfigError, match=f"needs columns {missing}, which the data lacks") as error:
        _formatted(record, format_name)
    assert error.value.key == "static.dataset.name"


def _write(path, records):
    dataset = Dataset.from_list(records)
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".jsonl":
        dataset.to_json(path, lines=True)
    elif path.suffix == ".parquet":
        dataset.to_parquet(path)
    else:
        dataset.to_csv(path, index=False)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_local_files_are_partitioned_iid(tmp_path, suffix):
    records = [{**CODE, "instruction": f"task {i}"} for i in range(10)]
    path = tmp_path / f"code{suffix}"
    _write(path, records)
    config = DatasetConfig(str(path), "code")
    check_local_dataset(config)
    parts = [load_partition(config, IID, SEED, i, 3) for i in range(3)]
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    prompts = [row["prompt"] for part in parts for row in part]
    assert len(set(prompts)) == 10  # disjoint and complete


def test_local_file_with_missing_columns_fails_before_training(tmp_path):
    path = tmp_path / "medical.jsonl"
    _write(path, [{"question": "q", "output": "a"}])
    with pytest.raises(ConfigError, match="format 'medical' needs columns input"):
        check_local_dataset(DatasetConfig(str(path), "medical"))


def test_missing_local_file_is_named(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(ConfigError, match=f"no such file: {path}"):
        check_local_dataset(DatasetConfig(str(path), "alpaca"))


def test_builtin_instructions_partition():
    config = DatasetConfig("builtin:instructions", "alpaca")
    check_local_dataset(config)
    assert len(load_partition(config, IID, SEED, 0, 2)) + len(load_partition(config, IID, SEED, 1, 2)) == 700


def test_a_node_trains_on_its_own_file_when_its_config_names_one(tmp_path):
    path = tmp_path / "clinic.jsonl"
    _write(path, [MEDICAL, {**MEDICAL, "input": "Where is bile stored?"}])
    shared = DatasetConfig("builtin:instructions", "alpaca")
    own_file = NodeConfig.parse({"dataset-path": str(path), "dataset-format": "medical"})
    own = load_node_dataset(shared, IID, SEED, own_file)
    assert len(own) == 2 and "Where is bile stored?" in own[1]["prompt"]
    # Without dataset-format the run's format applies; without dataset-path, the node's partition.
    medical = DatasetConfig("builtin:instructions", "medical")
    assert load_node_dataset(medical, IID, SEED, NodeConfig.parse({"dataset-path": str(path)}))[0] == own[0]
    assert len(load_node_dataset(shared, IID, SEED, NodeConfig.parse({"partition-id": 0, "num-partitions": 7}))) == 100


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({"dataset-path": "/nonexistent/clinic.jsonl"}, "dataset-path='/nonexistent/clinic.jsonl': no such file"),
        ({"num-partitions": 2}, "lacks 'partition-id'"),
    ],
)
def test_a_node_whose_data_cannot_be_found_names_the_key_and_path(node_config, message):
    with pytest.raises(NodeConfigError, match=message):
        load_node_dataset(DatasetConfig("builtin:instructions", "alpaca"), IID, SEED, NodeConfig.parse(node_config))


def test_a_held_out_share_is_disjoint_from_training_and_the_same_every_time():
    partition = load_partition(DatasetConfig("builtin:instructions", "alpaca"), IID, SEED, 1, 4)
    with_index = partition.add_column("row", list(range(len(partition))))
    train, held = split_held_out(with_index, 0.1, seed=42)
    assert len(held) == 18 and len(train) == len(partition) - 18  # ceil(175 * 0.1)
    assert not set(train["row"]) & set(held["row"]) and set(train["row"]) | set(held["row"]) == set(range(175))
    assert split_held_out(with_index, 0.1, seed=42) == (train, held)  # the same objects: tokenized once
    other = split_held_out(with_index.select(range(175)), 0.1, seed=42)[1]  # another process's copy, same seed
    assert other["row"] == held["row"]
    assert split_held_out(with_index.select(range(175)), 0.1, seed=7)[1]["row"] != held["row"]


def test_a_node_too_small_to_hold_out_and_train_says_so():
    tiny = Dataset.from_list([{"prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match="eval.fraction=0.5 of this node's 1 examples leaves 1 to evaluate and 0 to train"):
        split_held_out(tiny, 0.5, seed=0)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no examples"),
        ("\n\n", "no examples"),
        ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", oops}\n', "line 2 is not valid JSON"),
    ],
)
def test_a_local_file_that_cannot_be_read_is_named_with_its_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as error:
        check_local_dataset(DatasetConfig(str(path), "alpaca"))
    assert str(path) in str(error.value) and error.value.key == "static.dataset.name"


def test_fewer_examples_than_partitions_names_both_numbers(tmp_path):
    path = tmp_path / "two.jsonl"
    _write(path, [CODE, CODE])
    with pytest.raises(ConfigError, match="2 example\\(s\\), fewer than the 3 partitions"):
        load_partition(DatasetConfig(str(path), "code"), IID, SEED, 0, 3)
