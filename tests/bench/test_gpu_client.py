"""bench/gpu_client.py without a GPU: it refuses at once, and ``--cpu`` runs its whole path (both sides)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "bench" / "README.md"


def _bench(*arguments: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.gpu_client", *arguments], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False, env={**os.environ, **(env or {})})  # fmt: skip


def _error_lines(stderr: str) -> list[str]:
    # bitsandbytes prints a notice about an optional CPU kernel package on import; it is not ours.
    return [line for line in stderr.splitlines() if line.strip() and "kernels" not in line]


def test_without_a_gpu_it_stops_at_once_with_one_line_and_status_2(tmp_path):
    started = time.monotonic()
    done = _bench("--work", str(tmp_path / "work"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and time.monotonic() - started < 30
    assert _error_lines(done.stderr) == [(
        "error: bench.gpu_client needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
        "--cpu runs the same path on the CPU to check the benchmark"
    )]
    assert not (tmp_path / "work").exists()  # nothing built


def test_an_unknown_recipe_or_key_is_named_before_anything_is_built(tmp_path):
    done = _bench("--cpu", "--recipes", "medical/no-such-recipe", "--work", str(tmp_path / "work"))
    assert done.returncode == 2 and "medical/no-such-recipe" in done.stderr and "Traceback" not in done.stderr
    done = _bench("--cpu", "--run-config", "model.quantisation=8", "--work", str(tmp_path / "work"))
    assert done.returncode == 2 and "model.quantisation" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "work").exists()


def test_cpu_check_runs_the_app_and_plain_trl_in_8_bits(tmp_path):
    """The smallest recipe's model (one decoder layer) in 8 bits: the 8-bit recipes' path, at a tenth of the cost."""
    readme_before = hashlib.sha256(README.read_bytes()).hexdigest()
    done = _bench("--cpu", "--recipes", "medical/smollm2-135m-instruct_lora_4bit", "--run-config", "model.quantization=8",
                  "--layers", "1", "--batch", "2", "--seq-length", "64", "--warmup", "1", "--steps", "2",
                  "--work", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "gpu_client-cpu.json").read_text())
    (row,) = payload["rows"]
    assert row["shape"]["quantization"] == 8 and row["shape"]["batch"] == 2 and row["shape"]["seq_length"] == 64
    for side in ("app", "trl"):
        (run,) = row["runs"][side]
        assert run["steps_measured"] == 2 and run["padded_tokens_per_second"] >= run["tokens_per_second"] > 0
        assert run["peak_reserved_mib"] is None and run["peak_allocated_mib"] is None  # no GPU: null, not 0
        assert run["load_seconds"] > 0 and run["train_loss"] > 0
    # Both sides saw the same batches (same seed): the same share of padding.
    assert row["runs"]["app"][0]["padding_share"] == row["runs"]["trl"][0]["padding_share"]
    assert row["runs"]["app"][0]["app_token_count_agrees"]  # the app's own count = the benchmark's
    assert row["app_over_trl_tokens_per_second"] > 0
    assert hashlib.sha256(README.read_bytes()).hexdigest() == readme_before  # a CPU check never edits README
