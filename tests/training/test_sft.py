"""One round of local SFT is configured by the server's rate and the run's seed, and nothing else moves it."""

from __future__ import annotations

import pytest

from flowertune_llm.training.sft import optimizer_name, sft_config

from conftest import make_config


def test_a_round_trains_at_the_servers_rate_with_a_seed_of_its_own(tmp_path):
    config = make_config(**{"train.seed": 42})
    args = sft_config(config.train, config.model, learning_rate=2.5e-4, server_round=3, output_dir=str(tmp_path))
    assert args.learning_rate == 2.5e-4 and args.lr_scheduler_type == "constant" and args.warmup_steps == 0
    assert args.seed == 45  # train.seed + round: new batches each round, the same ones in every run
    assert args.completion_only_loss and args.max_length == config.train.seq_length
    assert not args.full_determinism  # CPU runs repeat without it


def test_deterministic_algorithms_are_asked_for_by_train_deterministic(tmp_path):
    config = make_config(**{"train.deterministic": True})
    assert sft_config(config.train, config.model, 1e-4, 1, str(tmp_path)).full_determinism


@pytest.mark.parametrize("optim, on_gpu, expected", [("paged_adamw_8bit", False, "adamw_8bit"),
                                                     ("paged_adamw_8bit", True, "paged_adamw_8bit"),
                                                     ("adamw_torch", False, "adamw_torch")])  # fmt: skip
def test_paged_optimizers_fall_back_to_their_unpaged_twin_without_a_gpu(optim, on_gpu, expected):
    assert optimizer_name(optim, on_gpu) == expected
