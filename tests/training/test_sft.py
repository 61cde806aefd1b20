"""One round of local SFT is configured by the server's rate and the run's seed, and nothing else moves it."""

from __future__ import annotations

import pytest
import torch

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


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _gradients(trainer, batch, num_items_in_batch):
    trainer.model.zero_grad()
    trainer.training_step(trainer.model, dict(batch), num_items_in_batch=num_items_in_batch)
    return [p.grad.clone() for p in _trainable(trainer.model)]


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("normalised_by_tokens", [False, True])
def test_fedprox_adds_mu_times_the_distance_to_the_global_adapter_to_the_gradient(accumulation, normalised_by_tokens):
    """d/dw (mu/2)·||w - w_global||² = mu·(w - w_global), once per optimizer step: 1/accumulation per micro-batch,
    whichever way Trainer scales the loss (by the accumulation steps, or by the batch's token count)."""
    from flowertune_llm.training import data, models
    from flowertune_llm.training.sft import build_trainer

    config = make_config(**{"train.training-arguments.gradient-accumulation-steps": accumulation})
    torch.manual_seed(0)
    model, tokenizer = models.build_peft_model(config.model), models.load_tokenizer(config.model)
    dataset = data.load_partition(config.dataset, config.partition, config.train.seed, 0, 4)
    mu = 0.5
    with_term, _ = build_trainer(model, tokenizer, dataset, config.train, config.model, 1e-3, 1, proximal_mu=mu)
    without_term, _ = build_trainer(model, tokenizer, dataset, config.train, config.model, 1e-3, 1)
    for trainer in (with_term, without_term):
        trainer.current_gradient_accumulation_steps = accumulation  # what the training loop sets
    anchors = [p.detach().clone() for p in _trainable(model)]
    with torch.no_grad():  # as after a few local steps: away from the global adapter
        for p in _trainable(model):
            p.add_(torch.randn_like(p) * 0.05)
    batch = next(iter(with_term.get_train_dataloader()))
    tokens = int((batch["labels"] != -100).sum()) if normalised_by_tokens else None
    got, plain = _gradients(with_term, batch, tokens), _gradients(without_term, batch, tokens)
    for g, p, w, anchor in zip(got, plain, _trainable(model), anchors, strict=True):
        torch.testing.assert_close(g - p, mu * (w.detach() - anchor) / accumulation, rtol=1e-4, atol=1e-7)
    # The reported loss stays the task's: the term moves the gradient only.
    model.eval()
    loss_with = with_term.compute_loss(model, dict(batch), num_items_in_batch=tokens)
    loss_without = without_term.compute_loss(model, dict(batch), num_items_in_batch=tokens)
    assert float(loss_with.detach()) == float(loss_without.detach())
    model.train()
    assert float(with_term.compute_loss(model, dict(batch), num_items_in_batch=tokens)) == pytest.approx(
        float(without_term.compute_loss(model, dict(batch), num_items_in_batch=tokens)), rel=1e-6)


def test_without_mu_no_anchor_is_taken():
    from flowertune_llm.training import data, models
    from flowertune_llm.training.sft import build_trainer

    config = make_config()
    model, tokenizer = models.build_peft_model(config.model), models.load_tokenizer(config.model)
    dataset = data.load_partition(config.dataset, config.partition, config.train.seed, 0, 4)
    trainer, _ = build_trainer(model, tokenizer, dataset, config.train, config.model, 1e-3, 1)
    assert trainer._anchors == []  # no copy of the adapter when FedProx is off
