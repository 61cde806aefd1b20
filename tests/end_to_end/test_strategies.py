"""Strategies and compressed updates in a real `flwr run` (Simulation Engine, 2 SuperNodes, the quickstart)."""

from __future__ import annotations

import json

import pytest
from peft import AutoPeftModelForCausalLM

from flowertune_llm.weights.codec import CHANGE_DIR
from flowertune_llm.weights.server_optimizers import STATE_DIR
from testbed.flower import simulation_superlink

from conftest import APP_DIR, STRATEGY_ROUNDS, strategy_config

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fedprox_run):
    """FedAdam with int8 updates (here) and FedProx with bfloat16 ones (the session's `flowertune-llm run` run)."""
    tmp_path = tmp_path_factory.mktemp("strategies")
    output_dir = tmp_path / "runs"
    with simulation_superlink(tmp_path) as link:
        result = link.run_app(APP_DIR, run_config=strategy_config(output_dir, "strategy.name='fedadam' exchange.update-format='int8'"))
    _, fedprox, fedprox_dir = fedprox_run
    return {"fedadam-int8": (result, output_dir / str(result.run_id)), "fedprox-bfloat16": (fedprox, fedprox_dir)}


@pytest.mark.parametrize("name", ["fedadam-int8", "fedprox-bfloat16"])
def test_a_strategy_with_compressed_updates_trains_and_saves_a_peft_adapter(runs, name):
    result, run_dir = runs[name]
    assert result.ok, result.details
    assert "Strategy: " + name.split("-")[0] in result.output
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3] and all(r["failures"] == {} for r in history)
    assert all(r["eval_loss"] > 0 and r["eval_failures"] == {} for r in history)
    checkpoint = run_dir / "checkpoints" / f"round-{STRATEGY_ROUNDS}"
    assert (checkpoint / CHANGE_DIR).is_dir() and (checkpoint / STATE_DIR).is_dir() == name.startswith("fedadam")
    AutoPeftModelForCausalLM.from_pretrained(str(checkpoint))  # a standard PEFT adapter


@pytest.mark.parametrize("name, most", [("fedadam-int8", 0.45), ("fedprox-bfloat16", 0.6)])
def test_compressed_updates_cut_the_bytes_each_way_after_round_1(runs, name, most):
    """Round 1 sends the weights down (no node holds a model yet) and evaluates the new model as a change;
    after it, the nodes hold the model they evaluated, so nothing goes down for training, and their updates
    go up as changes. (The quickstart's LoRA B rows are r=8 values, each an int8 block with a 4-byte scale.)"""
    from flowertune_llm.config import default_run_config, parse_run_config
    from flowertune_llm.training import models
    from flowertune_llm.weights.transport import to_record

    quickstart = parse_run_config({**default_run_config(), "preset": "quickstart"})
    weights = to_record(models.get_adapter_state(models.build_peft_model(quickstart.model))).count_bytes()
    history = json.loads((runs[name][1] / "history.json").read_text())
    nodes = len(history[0]["nodes"])
    assert history[0]["bytes_down"] > nodes * weights  # the weights for training, then the change to evaluate
    for record in history[1:]:
        assert record["bytes_up"] < most * nodes * weights
        assert record["bytes_down"] < most * nodes * weights  # only the change for evaluation
