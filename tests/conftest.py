"""Shared fixtures and helpers: an isolated cache for built-in models, small run configs, tensors compared bit by bit.

Tests mirror the package: ``tests/<package>/test_<module>.py`` tests ``flowertune_llm/<package>/<module>.py``;
``tests/end_to_end/`` runs the apps in real Flower engines. What tests share with the benchmarks (real
Flower runs, stand-in grids, the NumPy reference mean) lives in ``testbed/``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Message

from flowertune_llm.config import RunConfig, default_run_config, parse_run_config
from flowertune_llm.federated import protocol
from flowertune_llm.observe.profiling import Recorder
from flowertune_llm.units import MiB
from flowertune_llm.weights.tensors import Piece
from testbed.flower import RunResult, simulation_superlink

# Built-in models are built once per test session into a private cache, never into the user's home.
os.environ.setdefault("FLOWERTUNE_LLM_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "flowertune-llm-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

APP_DIR = Path(__file__).resolve().parents[1]

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


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages stamp the sending task's identity, which Flower sets when it starts an app."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in {"_run_id": 7, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


# --- tensors -------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(bits(a[key]), bits(b[key])), key


def model_state(dtype: torch.dtype, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A small Llama-like state: an embedding and head larger than the rest, a norm, two projections."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale).to(dtype)

    return {
        "model.embed_tokens.weight": rand(37, 8),
        "model.layers.0.input_layernorm.weight": rand(8),
        "model.layers.0.self_attn.q_proj.weight": rand(8, 8),
        "model.layers.0.mlp.down_proj.weight": rand(8, 12),
        "model.norm.weight": rand(8),
        "lm_head.weight": rand(37, 8),
    }


def pieces_of(state: Mapping[str, torch.Tensor], group: Sequence[Piece]) -> dict[str, torch.Tensor]:
    """A group's pieces of an in-memory state, as views, keyed as a message carries them."""
    return {piece.key: piece.take(state[piece.name]) for piece in group}


def as_message(record: ArrayRecord) -> Message:
    """Weights in a Flower message, as a node's ``train.send`` reply carries them."""
    return Message(protocol.SendRes(record).to_content(), dst_node_id=1, message_type=protocol.SEND)


def record_of(message: Message) -> ArrayRecord:
    return protocol.SendRes.from_content(message.content).arrays


def through_deployment(record: ArrayRecord) -> ArrayRecord:
    """The Deployment Engine's path: deflate every object of the message, inflate from those bytes alone."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    message = as_message(record)
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    return record_of(inflate_object_from_contents(message.object_id, contents))


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under a directory by relative path, with its bytes: two checkpoints compared byte for byte."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- profiles ---


def record_a_round(recorder: Recorder, server_round: int) -> None:
    """A server round as the round loop records it: spans, a message each way, two arrivals, memory."""
    recorder.round = server_round
    with recorder.span("round"):
        with recorder.span("configure"):
            time.sleep(0.01)
        recorder.emit({"kind": "message", "node": 5, "direction": "down", "bytes": 1000})
        recorder.record_span("wait", 0.05, time.time())
        time.sleep(0.05)
        recorder.emit({"kind": "arrival", "node": 5, "order": 1, "seconds": 0.04})
        recorder.emit({"kind": "arrival", "node": 6, "order": 2, "seconds": 0.05})
        recorder.emit({"kind": "message", "node": 5, "direction": "up", "bytes": 1000})
        with recorder.span("aggregate"):
            time.sleep(0.01)
    recorder.memory()


# --- a real run, shared ---

QUICKSTART_ROUNDS = 4


QUICKSTART_FEDERATION = "num-supernodes=3 client-resources-num-cpus=1"


def quickstart_config(output_dir: Path, **extra: object) -> str:
    """The shared run's config: the quickstart preset, its rounds, output directory, evaluation and profile."""
    settings = {"preset": "'quickstart'", "num-server-rounds": QUICKSTART_ROUNDS, "train.save-every-round": 2,
                "output.dir": f"'{output_dir}'", "profile.enabled": "true", "eval.every-round": 1,
                "eval.fraction": 0.2, **extra}  # fmt: skip
    return " ".join(f"{key}={value}" for key, value in settings.items())


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """A real `flwr run` of the quickstart (3 SuperNodes, profiled), shared by every test that reads a trained run."""
    tmp_path = tmp_path_factory.mktemp("simulation")
    output_dir = tmp_path / "runs"
    with simulation_superlink(tmp_path) as link:
        result = link.run_app(APP_DIR, run_config=quickstart_config(output_dir), federation_config=QUICKSTART_FEDERATION)
    return result, output_dir / str(result.run_id)


# --- commands ------------------------------------------------------------------------------------------------


def profile_command(run_id: int, run_dir: Path, output_format: str, plot: Path) -> str | dict:
    """Run `flowertune-llm profile` on a finished run as a user would; return what it printed."""
    completed = subprocess.run(
        ["flowertune-llm", "profile", str(run_id), "--output-dir", str(run_dir.parent),
         "--format", output_format, "--plot", str(plot)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert plot.stat().st_size > 10_000
    return json.loads(completed.stdout) if output_format == "json" else completed.stdout


def table_rows(printed: str, title: str) -> list[list[str]]:
    """The cells of the table printed under ``title`` (a heading line, a ruler, then one row per line)."""
    lines = printed.split(f"{title}\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.split() for line in lines[2:]]


def profiled_run_report(run_id: int, run_dir: Path, tmp_path: Path) -> dict:
    """`flowertune-llm profile` in both formats; the table must show the JSON's figures. Returns the JSON."""
    report = profile_command(run_id, run_dir, "json", tmp_path / "timeline-json.png")
    table = profile_command(run_id, run_dir, "table", tmp_path / "timeline-table.png")
    rounds, nodes = table_rows(table, "Per round"), table_rows(table, "Per node")
    assert [int(row[0]) for row in rounds] == [r["round"] for r in report["rounds"]]
    assert [(row[8], row[9]) for row in rounds] == [
        (f"{r['bytes_down'] / MiB:.2f}", f"{r['bytes_up'] / MiB:.2f}") for r in report["rounds"]
    ]  # down MiB, up MiB
    assert [(row[0], int(row[1])) for row in nodes] == [(str(n["node"]), n["rounds"]) for n in report["nodes"]]
    return report


# --- `flowertune-llm run`, and a strategy run shared through it ---

FLOWERTUNE_RUN = [sys.executable, "-m", "flowertune_llm.cli", "run"]
STRATEGY_ROUNDS = 3


def strategy_config(output_dir: Path, settings: str) -> str:
    """The quickstart with a strategy and an update format, evaluated every round, its last round kept."""
    return (f"preset='quickstart' num-server-rounds={STRATEGY_ROUNDS} train.save-every-round={STRATEGY_ROUNDS} "
            f"output.dir='{output_dir}' eval.every-round=1 eval.fraction=0.2 {settings}")  # fmt: skip


def run_result_of(done: subprocess.CompletedProcess[str]) -> RunResult:
    """What `flowertune-llm run` reported: its last line names the run and its status; stdout is the run's log."""
    ended = re.search(r"^Run (\d+): (\S+)$", done.stderr, re.MULTILINE)
    assert ended, done.stdout[-2000:] + done.stderr[-2000:]
    return RunResult(int(ended.group(1)), ended.group(2), done.stderr[-500:], done.stdout)


@pytest.fixture(scope="session")
def fedprox_run(tmp_path_factory):
    """FedProx with bfloat16 updates, started with `flowertune-llm run` on a simulation SuperLink: one real run that
    tests/deploy/test_run_command.py reads as a good run (status 0, its directory printed) and
    tests/end_to_end/test_strategies.py as a strategy run (each test checks what it owns)."""
    tmp_path = tmp_path_factory.mktemp("fedprox")
    output_dir = tmp_path / "runs"
    settings = "strategy.name='fedprox' strategy.proximal-mu=0.1 exchange.update-format='bfloat16'"
    with simulation_superlink(tmp_path) as link:
        done = subprocess.run([*FLOWERTUNE_RUN, str(APP_DIR), link.connection, "--run-config", strategy_config(output_dir, settings)],
                              env=link.env, cwd=APP_DIR, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    result = run_result_of(done)
    return done, result, output_dir / str(result.run_id)
