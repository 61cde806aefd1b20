"""The Grid stand-ins the benchmarks and tests drive the real round loop with."""

from __future__ import annotations

import torch

from flowertune_llm.config import to_flat_dict
from flowertune_llm.federated.run_directory import RunDirectory
from flowertune_llm.federated.strategy import StreamingStrategy
from flowertune_llm.weights.exchange import Exchange
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.shards import save_local_checkpoint
from flowertune_llm.weights.tensors import specs_of
from testbed.grids import ProcessGrid
from testbed.reference import torch_weighted_mean

from conftest import assert_bit_equal, make_config, model_state


def test_process_grid_runs_a_round_with_nodes_in_their_own_processes(tmp_path):
    states = [model_state(torch.bfloat16, seed=k) for k in range(2)]
    settings = {"num-server-rounds": 1, "strategy.fraction-train": 1.0, "train.training-arguments.max-steps": 0,
                "aggregation.max-message-mb": 1 / 1024, "output.dir": str(tmp_path / "runs")}  # fmt: skip
    config = make_config(**settings)
    node_configs = [{"model-path": str(save_local_checkpoint(state, tmp_path / f"m{k}")), "state-dir": str(tmp_path / "s")}
                    for k, state in enumerate(states)]  # fmt: skip
    exchange = Exchange.for_full_model(config, specs_of(states[0]), {"config.json": b"{}"})
    with ProcessGrid(node_configs, to_flat_dict(config)) as grid:
        strategy = StreamingStrategy(config, RunDirectory.create(tmp_path / "runs", 1, {}), exchange)
        final = strategy.run(grid, None)
        reports = grid.memory()
    assert strategy.history[0].aggregated == ["node-1", "node-2"] and strategy.history[0].groups > 1
    with LocalCheckpoint(final) as checkpoint:
        assert_bit_equal({n: checkpoint.tensor(n) for n in states[0]}, torch_weighted_mean(states, [1.0, 1.0]))
    assert len(reports) == 2 and all(r["vmhwm_mb"] > 0 for r in reports)
