"""A real `flwr run` in the Simulation Engine: 3 SuperNodes, 3 rounds, the built-in model, offline, profiled."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from flowertune_llm.builtin.make_instructions import make_instructions
from flowertune_llm.config import DatasetConfig, default_run_config, parse_run_config
from flowertune_llm.observe.report import load_profile, summarize
from flowertune_llm.training import models
from flowertune_llm.training.data import format_dataset
from flowertune_llm.weights.transport import to_record

from conftest import APP_DIR, profiled_run_report
from conftest import QUICKSTART_ROUNDS as ROUNDS

pytestmark = pytest.mark.simulation
QUICKSTART = parse_run_config({**default_run_config(), "preset": "quickstart"})


def completion_loss(model, tokenizer, rows: Dataset) -> float:
    """Mean cross-entropy over response tokens only, as training computes it."""
    losses = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        full = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        labels = [-100] * len(prompt) + full[len(prompt) :]
        with torch.no_grad():
            output = model(input_ids=torch.tensor([full]), labels=torch.tensor([labels]))
        losses.append(output.loss.item())
    return sum(losses) / len(losses)


def test_run_completes_and_logs_each_round(quickstart_run):
    result, run_dir = quickstart_run
    assert result.ok, result.details
    for server_round in range(1, ROUNDS + 1):
        assert f"[round {server_round}/{ROUNDS}] train_loss" in result.output
    assert f"Run directory: {run_dir}" in result.output


def test_history_shows_falling_loss_and_exact_byte_counts(quickstart_run):
    _, run_dir = quickstart_run
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    losses = [r["train_loss"] for r in history]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert (run_dir / "loss.png").stat().st_size > 10_000

    adapter = models.get_adapter_state(models.build_peft_model(QUICKSTART.model))
    payload = to_record(adapter).count_bytes()
    for record in history:
        assert len(record["nodes"]) == 3 and record["failures"] == {}
        # The adapter goes down to train, and once more, averaged, to be evaluated; evaluate replies carry none.
        assert record["bytes_down"] == payload * (len(record["nodes"]) + len(record["eval_nodes"]))
        assert record["bytes_up"] == payload * len(record["aggregated"])
    saved = json.loads((run_dir / "run_config.json").read_text())
    assert saved["num-server-rounds"] == ROUNDS and saved["model.name"] == "builtin:tiny-llama"


def test_checkpoints_load_with_peft_and_beat_the_initial_adapter(quickstart_run, tmp_path, monkeypatch):
    _, run_dir = quickstart_run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-2", f"round-{ROUNDS}"]
    final = run_dir / "checkpoints" / f"round-{ROUNDS}"
    monkeypatch.chdir(tmp_path)  # the base model path inside the adapter is absolute

    base_path = models.resolve_model_path(QUICKSTART.model.name)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    # Fresh examples from the same tasks, drawn with a seed the shipped set does not use.
    held_out = format_dataset(Dataset.from_list(make_instructions(40, seed=123)), DatasetConfig("-", "alpaca"))

    # The initial global adapter is PEFT's initialisation, LoRA B = 0: exactly the base model.
    initial_loss = completion_loss(AutoModelForCausalLM.from_pretrained(base_path), tokenizer, held_out)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(final))
    final_loss = completion_loss(trained, tokenizer, held_out)
    assert final_loss < initial_loss - 0.1, (initial_loss, final_loss)

    auto = AutoPeftModelForCausalLM.from_pretrained(str(final))
    tokens = torch.tensor([[1, 40, 50, 60]])
    torch.testing.assert_close(auto(input_ids=tokens).logits, trained(input_ids=tokens).logits)


def test_test_py_answers_with_the_final_adapter(quickstart_run):
    _, run_dir = quickstart_run
    final = run_dir / "checkpoints" / f"round-{ROUNDS}"
    completed = subprocess.run(
        [sys.executable, str(APP_DIR / "test.py"), "--peft-path", str(final), "--question", "What is the capital of France?",
         "--template", "alpaca", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip()


def test_profile_accounts_for_each_round(quickstart_run, tmp_path):
    result, run_dir = quickstart_run
    profile = load_profile(run_dir / "profile.jsonl")
    assert profile.warnings == []
    summary = summarize(profile.events)
    assert json.loads((run_dir / "profile_summary.json").read_text()) == json.loads(json.dumps(summary))
    assert "Per round" in result.output and "Per node" in result.output  # printed at the end, so `flwr log` has it

    history = json.loads((run_dir / "history.json").read_text())
    for row, record in zip(summary["rounds"], history):
        # The named parts (configure, send, wait, decode, aggregate, history, checkpoint) add up to the round.
        assert 0.95 <= row["coverage"] <= 1.0, row
        assert row["bytes_down"] == record["bytes_down"] and row["bytes_up"] == record["bytes_up"]
        assert row["train_seconds_max"] >= row["train_seconds_median"] > 0
        assert row["server_peak_rss_mb"] > 0 and row["client_peak_rss_mb"] > 0
    nodes = summary["nodes"]
    assert len(nodes) == 3 and all(n["rounds"] == ROUNDS for n in nodes)
    # Simulation actors keep the model: each actor loads it once, every later round is a cache hit.
    assert sum(n["model_loads"] for n in nodes) <= 2
    assert all(n["tokens_per_second_median"] > 0 for n in nodes)

    # Client spans nest inside their handler and add up to at most its length.
    spans = [e for e in profile.events if e["kind"] == "span" and e["node"] != "server"]
    kinds = []
    for handler in (e for e in spans if e["name"] == "handler"):
        end = handler["start"] + handler["seconds"]
        children = [e for e in spans if e["parent"] == "handler" and e["node"] == handler["node"]
                    and handler["start"] <= e["start"] <= end]  # fmt: skip
        # A training handler, (eval.every-round=1) an evaluation one, or the name query (nothing inside).
        names = {c["name"] for c in children}
        assert names in ({"model_load", "adapter_in", "data_load", "train", "adapter_out"},
                         {"model_load", "adapter_in", "data_load", "eval"}, set())  # fmt: skip
        assert sum(c["seconds"] for c in children) <= handler["seconds"]
        kinds.append("eval" if "eval" in names else "train" if names else "query")
    # Each node is asked its name once per run, before its first round.
    assert kinds.count("query") == 3 and {"train", "eval"} <= set(kinds)


def test_profile_command_reads_the_run(quickstart_run, tmp_path):
    result, run_dir = quickstart_run
    report = profiled_run_report(result.run_id, run_dir, tmp_path)
    assert report["run_dir"] == str(run_dir) and len(report["rounds"]) == ROUNDS and len(report["nodes"]) == 3


def test_federated_evaluation_scores_each_round_on_held_out_examples_never_trained_on(quickstart_run):
    from flowertune_llm.training.data import load_partition, split_held_out

    _, run_dir = quickstart_run
    history = json.loads((run_dir / "history.json").read_text())
    # eval.fraction=0.2 of partitions of 234, 233 and 233 examples: 47 held out on each node.
    assert all(r["eval_loss"] > 0 and r["eval_examples"] == 3 * 47 and r["eval_failures"] == {} for r in history)
    assert all(sorted(r["eval_nodes"]) == sorted(r["aggregated"]) for r in history)
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]  # the held-out loss falls with training
    # Each node trained on what it did not hold out: its spans count 187 or 186 examples trained, 47 evaluated.
    spans = [e for e in load_profile(run_dir / "profile.jsonl").events if e.get("name") == "data_load"]
    parents = {e["parent"] for e in spans}
    assert parents == {"handler"}
    assert sorted({e["examples"] for e in spans}) == [47, 186, 187]
    # And the split those counts come from holds out a disjoint share, the same in every process.
    partition = load_partition(QUICKSTART.dataset, QUICKSTART.partition, QUICKSTART.train.seed, 0, 3)
    rows = partition.add_column("row", list(range(len(partition))))  # the split depends on length and seed only
    train, held = split_held_out(rows, 0.2, QUICKSTART.train.seed)
    assert not set(train["row"]) & set(held["row"]) and len(train) + len(held) == len(partition)
    assert split_held_out(partition, 0.2, QUICKSTART.train.seed)[1]["prompt"] == held["prompt"]
