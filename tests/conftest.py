"""Shared fixtures: an isolated cache for built-in models and small run configs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from flowertune_llm.config import RunConfig, default_run_config, parse_run_config

# Built-in models are built once per test session into a private cache, never into the user's home.
os.environ.setdefault("FLOWERTUNE_LLM_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "flowertune-llm-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY = {
    "model.name": "builtin:tiny-llama",
    "model.quantization": 0,
    "model.dtype": "float32",
    "model.gradient-checkpointing": False,
    "model.lora.peft-lora-r": 4,
    "model.lora.peft-lora-alpha": 8,
    "model.lora.peft-lora-dropout": 0.0,
    "model.lora.target-modules": "q_proj,v_proj",
    "train.seq-length": 96,
    "train.training-arguments.per-device-train-batch-size": 4,
    "train.training-arguments.max-steps": 2,
    "train.training-arguments.optim": "adamw_torch",
    "static.dataset.name": "builtin:instructions",
    "static.dataset.format": "alpaca",
}


def make_config(**overrides: Any) -> RunConfig:
    """The app defaults with the tiny built-in model, plus ``overrides`` given as dotted keys."""
    flat = default_run_config()
    flat.update(TINY)
    flat.update(overrides)
    return parse_run_config(flat)


@pytest.fixture
def tiny_config() -> RunConfig:
    return make_config()


def load_bench(name: str):
    """A module of ``bench/`` (not a package), e.g. the NumPy baseline the tests hold the mean to."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_content(adapter, server_round: int, learning_rate: float = 1e-3):
    """A one-group ``train`` message's content carrying the whole global adapter, as the server sends it."""
    from flwr.app import ConfigRecord, RecordDict

    from flowertune_llm.transport import specs_of, specs_to_json, to_record

    config = {"server-round": server_round, "learning-rate": learning_rate, "group": 0, "groups": 1,
              "manifest": specs_to_json(specs_of(adapter)), "reply-keys": list(adapter)}  # fmt: skip
    return RecordDict({"arrays": to_record(adapter), "config": ConfigRecord(config)})


def profile_command(run_id: int, run_dir: Path, output_format: str, plot: Path) -> str:
    """Run `flowertune-llm profile` on a finished run as a user would; return what it printed."""
    completed = subprocess.run(
        ["flowertune-llm", "profile", str(run_id), "--output-dir", str(run_dir.parent),
         "--format", output_format, "--plot", str(plot)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert plot.stat().st_size > 10_000
    return json.loads(completed.stdout) if output_format == "json" else completed.stdout
