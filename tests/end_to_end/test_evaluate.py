"""`flowertune-llm evaluate` on the adapter a real quickstart run trained, with local copies of two datasets."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import QUICKSTART_ROUNDS

pytestmark = pytest.mark.simulation
DATA = Path(__file__).parents[1] / "evaluate" / "data"


def evaluate(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["flowertune-llm", "evaluate", *argv], capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("challenge, datasets", [("general-nlp", "stem,humanities"), ("finance", "fpb,tfns")])
def test_an_adapter_of_a_real_run_is_evaluated_and_its_predictions_rescore_to_the_same(quickstart_run, tmp_path, challenge, datasets):
    _, run_dir = quickstart_run
    adapter = run_dir / "checkpoints" / f"round-{QUICKSTART_ROUNDS}"
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    done = evaluate("--challenge", challenge, "--peft-path", str(adapter), "--data-dir", str(data),
                    "--datasets", datasets, "--quantization", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output = run_dir / "evaluation" / f"{challenge}-round-{QUICKSTART_ROUNDS}.json"  # beside the run's other outputs
    results = json.loads(output.read_text())
    predictions = output.with_suffix(".predictions.jsonl")
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    names = datasets.split(",")
    assert [r["dataset"] for r in rows] == [n for n in names for _ in range(results["datasets"][n]["count"])]
    assert all(set(r) == {"dataset", "output", "target"} for r in rows)
    history = json.loads((run_dir / "history.json").read_text())
    assert results["communication_mb"] == pytest.approx(sum(r["bytes_down"] + r["bytes_up"] for r in history) / 2**20)
    assert results["peft_path"] == str(adapter) and results["base_model"].endswith("tiny-llama-v1")
    assert f"Results: {output}" in done.stderr and "| Avg | Comm. Costs |" in done.stdout

    again = evaluate("--challenge", challenge, "--datasets", datasets, "--predictions", str(predictions),
                     "--peft-path", str(adapter), "--output", str(tmp_path / "again.json"))  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "again.json").read_text()) == results
