"""An aggregation-only run of a whole model, all at once, in a real `flwr run` (Simulation Engine).

Every simulated node holds the same model (``model.name``), so the weighted mean is that model exactly
(for bf16 weights and three nodes, ``(x + x + x) / 3`` is exact in float32). Nodes holding different
weights, and the exact weighted mean of those, are tested on real SuperNodes in test_layerwise_deployment.py
and against the round loop in tests/federated/test_strategy.py, which also covers float16 models (a real
run per dtype would add ~25 s to the suite and test nothing the engine does differently). The layer-wise
mode runs for real in test_layerwise_deployment.py (groups over the wire); that both modes give the same
bytes is tested in-process in test_strategy.py (a real run per mode per engine would add ~25 s each).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flowertune_llm.observe.profiling import PROFILE_FILE
from flowertune_llm.observe.report import load_profile
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from testbed.flower import simulation_superlink
from testbed.models import aggregation_only_run, small_llama

from conftest import APP_DIR

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("layerwise")
    results = {}
    dtype = torch.bfloat16
    model_dir = small_llama(tmp_path / "model", dtype)
    with simulation_superlink(tmp_path) as link:
        output_dir = tmp_path / "runs"
        # The dataset does not exist: an aggregation-only run must never look for it.
        extra = f"model.device-map='cpu' profile.enabled=true static.dataset.name='{tmp_path / 'no-such-dataset.jsonl'}'"
        result = link.run_app(APP_DIR, run_config=aggregation_only_run(model_dir, "all_at_once", output_dir, extra),
                              federation_config="num-supernodes=3 client-resources-num-cpus=1")  # fmt: skip
        results[dtype, "all_at_once"] = (result, model_dir, output_dir / str(result.run_id))
    return results


def test_the_run_writes_the_model_itself_bit_for_bit(runs, dtype=torch.bfloat16):
    result, model_dir, run_dir = runs[dtype, "all_at_once"]
    assert result.ok, result.details
    final = run_dir / "checkpoints" / "round-2"
    with LocalCheckpoint(model_dir) as original, LocalCheckpoint(final) as averaged:
        assert list(averaged.specs) == list(original.specs)
        for name in original.specs:
            assert averaged.tensor(name).dtype == dtype
            assert torch.equal(averaged.tensor(name).view(torch.uint8), original.tensor(name).view(torch.uint8))
    model = AutoModelForCausalLM.from_pretrained(final)  # a loadable model, config.json included
    assert next(model.parameters()).dtype == dtype


def test_all_at_once_moves_one_group_and_reports_it(runs):
    result, _, run_dir = runs[torch.bfloat16, "all_at_once"]
    history = json.loads((run_dir / "history.json").read_text())
    first, second = history
    assert first["groups"] == 1 and first["bytes_down"] == 0 and second["bytes_down"] > 0
    assert first["aggregated"] == sorted(first["nodes"]) and len(first["nodes"]) == 3 and first["train_loss"] is None
    assert f"{first['groups']} group(s)" in result.output and "full-model weights" in result.output
    events = load_profile(run_dir / PROFILE_FILE).events
    writes = [e for e in events if e["kind"] == "span" and e["name"] == "write" and e["round"] == 1]
    assert sorted(e["group"] for e in writes) == list(range(first["groups"]))


def test_an_aggregation_only_run_never_loads_data_or_a_model_on_the_nodes(runs):
    _, _, run_dir = runs[torch.bfloat16, "all_at_once"]
    spans = {e["name"] for e in load_profile(run_dir / PROFILE_FILE).events if e["kind"] == "span" and e["node"] != "server"}
    assert "adapter_out" in spans
    assert not spans & {"data_load", "model_load", "adapter_in", "train"}
