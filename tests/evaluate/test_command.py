"""``flowertune-llm evaluate``: saved generations scored by hand-computed rules, bad input named before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flowertune_llm.cli import main
from flowertune_llm.evaluate import generation

DATA = Path(__file__).with_name("data")


def fixture_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    """Scoring saved generations and refusing bad input must never load a model."""
    monkeypatch.setattr(generation, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


def score(tmp_path, challenge: str, rows: list[tuple[str, str, str]], *extra: str) -> dict:
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"dataset": d, "output": o, "target": t}) + "\n" for d, o, t in rows))
    output = tmp_path / "results.json"
    assert main(["evaluate", "--challenge", challenge, "--predictions", str(predictions), "--output", str(output), *extra]) == 0
    return json.loads(output.read_text())


def scores(results: dict) -> dict[str, float]:
    return {name: round(100 * next(v for k, v in entry.items() if k in ("accuracy", "pass@1")), 2)
            for name, entry in results["datasets"].items()}  # fmt: skip


def test_general_nlp_scores_each_category_by_the_first_letter_rule(tmp_path):
    results = score(tmp_path, "general-nlp", [
        ("stem", "B", "B"), ("stem", "Both", "B"), ("stem", "the answer is B", "B"), ("stem", "c", "C"),
        ("social_sciences", "A", "A"), ("social_sciences", "\nB", "A"),
        ("humanities", "Answer", "A"), ("other", "A", "B"),  # "other" is not a leaderboard category: not read
    ])  # fmt: skip
    assert scores(results) == {"stem": 75.0, "social_sciences": 50.0, "humanities": 100.0}
    assert results["average"] == 75.0 and results["datasets"]["stem"]["count"] == 4


def test_finance_positive_wins_and_anything_else_is_neutral(tmp_path):
    results = score(tmp_path, "finance", [
        ("fpb", "positive", "positive"), ("fpb", "Negative.", "negative"), ("fpb", "None", "neutral"),
        ("fpb", "positive and negative", "negative"), ("fiqa", "neutral", "neutral"), ("fiqa", "NEGATIVE", "negative"),
        ("tfns", "bullish", "positive"),
    ])  # fmt: skip
    assert scores(results) == {"fpb": 75.0, "fiqa": 50.0, "tfns": 0.0} and results["average"] == 41.67


def test_medical_maybe_counts_only_as_the_exact_word(tmp_path):
    results = score(tmp_path, "medical", [
        ("pubmedqa", "yes", "yes"), ("pubmedqa", " maybe", "maybe"), ("pubmedqa", "Maybe", "maybe"),
        ("medmcqa", "Calcium", "C"), ("medmcqa", "B", "C"), ("medmcqa", "", "A"), ("medqa", "D", "D"), ("careqa", "x", "A"),
    ])  # fmt: skip
    assert scores(results) == {"pubmedqa": 66.67, "medmcqa": 33.33, "medqa": 100.0, "careqa": 0.0}
    assert results["average"] == 50.0


def _program(dataset: str, solution: str) -> tuple[str, str, str]:
    from flowertune_llm.evaluate.benchmarks import by_name

    benchmark = by_name("code")[dataset]
    example = benchmark.build(dataset, fixture_rows(benchmark.source.name))[0]
    return dataset, example.prompt + solution, example.target


@pytest.mark.skipif(not (shutil.which("node") and shutil.which("g++")), reason="needs node and g++")
def test_code_is_scored_by_running_each_program_against_its_tests(tmp_path):
    results = score(tmp_path, "code", [
        _program("mbpp", "def square(x):\n    return x * x\n"), _program("mbpp", "def square(x):\n    return x + x\n"),
        _program("humaneval", "\n    return a + b\n"), _program("multiple-js", "\n  return a + b;\n}"),
        _program("multiple-cpp", "\n    return a - b;"),
    ])  # fmt: skip
    assert scores(results) == {"mbpp": 50.0, "humaneval": 100.0, "multiple-js": 100.0, "multiple-cpp": 0.0}
    assert results["average"] == 62.5 and results["sandbox"]["isolation"] in ("namespaces", "limits")
    assert results["sandbox"]["process_limit"] in ("RLIMIT_NPROC", "pids cgroup", "none")


def test_a_language_whose_tool_is_missing_is_skipped_not_scored_zero(tmp_path, monkeypatch, capsys):
    from flowertune_llm.evaluate import programs

    real = shutil.which
    monkeypatch.setattr(programs.shutil, "which", lambda name: None if name == "node" else real(name))
    results = score(tmp_path, "code", [_program("humaneval", "\n    return a + b\n")], "--datasets", "humaneval,multiple-js")
    assert results["datasets"]["multiple-js"] == {"pass@1": None, "count": 0, "skipped": "node is not installed: MultiPL-E js programs cannot run here"}
    assert results["average"] == 100.0
    assert "multiple-js: skipped, node is not installed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: {}, "no adapter_config.json"),
        (lambda d: {"adapter_config.json": "{"}, "adapter_config.json: not valid JSON"),
        (lambda d: {"adapter_config.json": "{}"}, "no adapter_model.safetensors"),
        (lambda d: {"adapter_config.json": "{}", "adapter_model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{}"},
         "adapter_model.safetensors: safetensors header of 16 bytes does not fit"),
    ],
)
def test_a_broken_adapter_is_named_in_one_line(tmp_path, capsys, make, message):
    adapter = tmp_path / "round-3"
    adapter.mkdir()
    for name, content in make(adapter).items():
        (adapter / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["evaluate", "--challenge", "finance", "--peft-path", str(adapter), "--data-dir", str(DATA)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and message in err


def test_a_truncated_adapter_is_named(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "round-1"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "builtin:tiny-llama"}')
    save_file({"w": torch.ones(64)}, adapter / "adapter_model.safetensors")
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[:-10])
    assert main(["evaluate", "--challenge", "medical", "--peft-path", str(adapter)]) == 2
    assert f"{adapter / 'adapter_model.safetensors'}: {len(data) - 10} bytes, its header describes {len(data)} (truncated?)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--challenge", "finance", "--datasets", "fpb,mmlu"], "--datasets 'fpb,mmlu': finance has fpb, fiqa, tfns"),
        (["--challenge", "finance"], "--peft-path is needed to generate"),
        (["--challenge", "medical", "--predictions", "/nowhere.jsonl"], "--predictions /nowhere.jsonl: no such file"),
    ],
)
def test_bad_arguments_are_named_in_one_line(capsys, argv, message):
    assert main(["evaluate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_data_file_lacking_columns_is_named_before_any_model_loads(tmp_path, capsys):
    adapter = tmp_path / "run" / "checkpoints" / "round-1"
    adapter.mkdir(parents=True)
    import torch
    from safetensors.torch import save_file

    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "builtin:tiny-llama"}')
    save_file({"w": torch.ones(4)}, adapter / "adapter_model.safetensors")
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    (data / "tfns.jsonl").write_text('{"tweet": "x", "label": 1}\n')
    assert main(["evaluate", "--challenge", "finance", "--peft-path", str(adapter), "--data-dir", str(data)]) == 2
    assert f"{data / 'tfns.jsonl'}: lacks column(s) text (has: tweet, label)" in capsys.readouterr().err


def test_a_predictions_file_with_a_bad_line_is_named(tmp_path, capsys):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"dataset": "fpb", "output": "positive", "target": "positive"}\n{"dataset": "fpb", "output": 3}\n')
    assert main(["evaluate", "--challenge", "finance", "--datasets", "fpb", "--predictions", str(predictions)]) == 2
    assert f'{predictions}:2: expected {{"dataset", "output", "target"}} as strings' in capsys.readouterr().err
