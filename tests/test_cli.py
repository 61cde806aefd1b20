"""The ``flowertune-llm`` command and test.py: a broken adapter is named in one line, before a model loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from flowertune_llm.cli import main

from conftest import APP_DIR


def adapter(tmp_path, truncate: int = 0, weights: bool = True):
    directory = tmp_path / "round-3"
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"base_model_name_or_path": "builtin:tiny-llama"}')
    if weights:
        save_file({"w": torch.ones(64)}, directory / "adapter_model.safetensors")
        data = (directory / "adapter_model.safetensors").read_bytes()
        (directory / "adapter_model.safetensors").write_bytes(data[: len(data) - truncate])
    return directory


@pytest.mark.parametrize("truncate, weights, message", [(10, True, "(truncated?)"), (0, False, "no adapter_model.safetensors")])
def test_chat_names_a_broken_adapter_in_one_line(tmp_path, capsys, truncate, weights, message):
    path = adapter(tmp_path, truncate, weights)
    assert main(["chat", "--peft-path", str(path), "--question", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and str(path) in err and "\n" not in err


def test_test_py_says_the_same_in_one_line(tmp_path):
    path = adapter(tmp_path, truncate=10)
    done = subprocess.run([sys.executable, str(APP_DIR / "test.py"), "--peft-path", str(path), "--question", "hi"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{path / 'adapter_model.safetensors'}:" in done.stderr


# --- flowertune-llm partitions -------------------------------------------------------------------------------


def sentiment_file(tmp_path, examples: int = 120):
    """A finance-format file whose `output` is a sentiment label: 1/2 positive, 1/3 negative, 1/6 neutral."""
    labels = ["positive", "positive", "positive", "negative", "negative", "neutral"]
    path = tmp_path / "sentiment.jsonl"
    path.write_text("".join(json.dumps({"instruction": "Sentiment?", "input": f"Headline {i}.", "output": labels[i % 6]})
                            + "\n" for i in range(examples)))  # fmt: skip
    return path


def test_partitions_prints_each_nodes_size_and_label_mix_and_plots_them(tmp_path, capsys):
    from flowertune_llm.config import DatasetConfig, PartitionConfig
    from flowertune_llm.training import data

    path, plot = sentiment_file(tmp_path), tmp_path / "plots" / "partitions.png"
    settings = f"static.dataset.name='{path}' static.dataset.format='finance' partition.method='dirichlet' train.seed=3"
    argv = ["partitions", "--run-config", f"{settings} partition.by='output'", "--num-partitions", "4"]
    assert main([*argv, "--format", "json", "--plot", str(plot)]) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["partitioning"] == "non-IID: dirichlet by output, alpha=0.5 (research runs; the leaderboard is IID)"
    assert (report["num_partitions"], report["seed"], report["examples"], report["labels"]) == (4, 3, 120, "output")
    # What each node trains on, as the node itself loads it.
    dirichlet = PartitionConfig("dirichlet", "output", 0.5, 2, 2)
    sizes = [len(data.load_partition(DatasetConfig(str(path), "finance"), dirichlet, 3, i, 4)) for i in range(4)]
    assert [n["examples"] for n in report["nodes"]] == sizes
    assert [n["node"] for n in report["nodes"]] == ["partition-0", "partition-1", "partition-2", "partition-3"]
    assert all(sum(n["labels"].values()) == n["examples"] for n in report["nodes"])
    assert {label for n in report["nodes"] for label in n["labels"]} == {"positive", "negative", "neutral"}
    assert f"Plot: {plot.resolve()}" in printed.err and plot.stat().st_size > 10_000
    # The table says the same, one row per node.
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.startswith("Partitioning: non-IID: dirichlet by output, alpha=0.5")
    rows = [line.split() for line in table.splitlines() if line.startswith("partition-")]
    assert [int(row[1]) for row in rows] == sizes


def test_partitions_takes_a_preset_and_flowers_default_number_of_nodes(capsys):
    assert main(["partitions", "--preset", "quickstart"]) == 0
    table = capsys.readouterr().out
    assert "Partitioning: IID (as the FlowerTune leaderboard requires)" in table
    assert "700 examples" in table and "Labels: @first-word" in table
    assert "2 nodes (Flower's default simulation" in table
    assert [line.split()[:2] for line in table.splitlines() if line.startswith("partition-")] == [
        ["partition-0", "350"], ["partition-1", "350"]
    ]  # fmt: skip
    federation = "num-supernodes=7 client-resources-num-cpus=1"  # as `flwr run --federation-config` takes it
    assert main(["partitions", "--preset", "quickstart", "--federation-config", federation]) == 0
    assert "7 nodes (--federation-config num-supernodes)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--run-config", "partition.method='random'"], "run config `partition.method` = 'random': allowed: iid,"),
        (["--run-config", "partition.size=3"], "run config `partition.size` = 3: unknown key"),
        (["--run-config", "partition.method='exponential'", "--num-partitions", "12"], "partition-0, partition-1,"),
        (["--labels", "@topic"], "--labels '@topic': no such column or derived label"),
    ],
)
def test_partitions_names_bad_input_in_one_line(capsys, extra, message):
    assert main(["partitions", "--preset", "quickstart", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
