"""Layer-wise aggregation on Flower's Deployment Engine: two SuperNodes on 127.0.0.1 (TLS, authenticated),
each holding its own copy of a small bf16 model with different weights, in an aggregation-only run.

The output must be the exact weighted mean of what the two nodes hold, bit for bit (a NumPy reference).
The all-at-once mode runs in a real engine in test_layerwise_simulation.py; that both modes write the same
bytes is tested in-process (tests/federated/test_strategy.py), with every group message through Flower's
wire format (tests/weights/test_streaming.py). Every process is stopped by PID in the fixture's teardown.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowertune_llm.deploy.federation import LocalFederation
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from testbed.flower import federation_link
from testbed.models import aggregation_only_run, small_llama
from testbed.reference import weighted_mean as numpy_mean

from conftest import APP_DIR

pytestmark = pytest.mark.deployment

WEIGHTS = (1.0, 3.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layerwise-deployment")
    models = []
    for node in range(2):
        torch.manual_seed(node)
        models.append(small_llama(tmp / f"model-{node}", torch.bfloat16, seed=node))
    node_configs = [
        {"model-path": str(model), "aggregation-weight": weight, "state-dir": str(tmp / "node-state")}
        for model, weight in zip(models, WEIGHTS)
    ]
    fed = LocalFederation(tmp / "federation", num_supernodes=2, tls=True, auth=True, node_configs=node_configs,
                          env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"})  # fmt: skip
    results = {}
    with fed:  # stops every process by PID on the way out, also when a test failed
        link = federation_link(fed)
        output_dir = tmp / "runs"
        result = link.run_app(APP_DIR, run_config=aggregation_only_run(models[0], "layerwise", output_dir), timeout=300)
        results["layerwise"] = (result, output_dir / str(result.run_id))
    assert not fed.pids(), "processes survived the federation"
    return results, models


def test_two_nodes_give_the_exact_weighted_mean_layer_by_layer(runs):
    results, models = runs
    expected_bits = numpy_mean([_bits(model) for model in models], WEIGHTS, bf16=True)
    for result, run_dir in results.values():
        assert result.ok, result.details
        history = json.loads((run_dir / "history.json").read_text())
        assert all(len(r["aggregated"]) == 2 and r["failures"] == {} for r in history)
        final = run_dir / "checkpoints" / "round-2"  # round 2 averages the round-1 mean both nodes received
        assert _bits(final).keys() == expected_bits.keys()
        for name, bits in _bits(final).items():
            np.testing.assert_array_equal(bits, expected_bits[name], err_msg=name)
    layer_history = json.loads((results["layerwise"][1] / "history.json").read_text())
    assert layer_history[0]["groups"] > 2 and layer_history[1]["bytes_down"] > 0


def _bits(checkpoint: Path) -> dict[str, np.ndarray]:
    with LocalCheckpoint(checkpoint) as loaded:
        return {name: loaded.tensor(name).view(torch.int16).numpy().view(np.uint16).copy() for name in loaded.specs}
