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


def test_a_round_counts_the_tokens_it_trains_on_and_the_padding_apart():
    """One step on one batch of four examples of known, different lengths: the real tokens are their sum,
    the padded ones four times the longest (the batch is padded to it)."""
    from datasets import Dataset

    from flowertune_llm.training import models
    from flowertune_llm.training.sft import build_trainer

    config = make_config(**{"train.training-arguments.max-steps": 1, "train.training-arguments.per-device-train-batch-size": 4})
    model, tokenizer = models.build_peft_model(config.model), models.load_tokenizer(config.model)
    rows = [{"prompt": f"Say {'one ' * n}", "completion": f" {'two ' * (n + 1)}"} for n in (1, 3, 6, 12)]
    dataset = Dataset.from_list(rows)
    trainer, _ = build_trainer(model, tokenizer, dataset, config.train, config.model, 1e-3, 1)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert len(set(lengths)) == 4 and max(lengths) < config.train.seq_length  # distinct, none truncated
    trainer.train()
    assert trainer.tokens == sum(lengths) and trainer.padded_tokens == 4 * max(lengths)


@pytest.mark.parametrize("quantization, reentrant", [(8, True), (4, None), (0, None)])
def test_only_an_8bit_model_checkpoints_reentrantly(tmp_path, quantization, reentrant):
    config = make_config(**{"model.quantization": quantization, "model.gradient-checkpointing": True})
    kwargs = sft_config(config.train, config.model, 1e-4, 1, str(tmp_path)).activation_checkpointing_kwargs
    assert (kwargs or {}).get("use_reentrant") is reentrant


def test_an_8bit_round_keeps_no_layer_inputs_alive_until_backward(monkeypatch):
    """What inflated the 8-bit path on a GPU, checked on the CPU: bitsandbytes' GPU matmul (``MatMul8bitLt``,
    forced here in place of its CPU twin) keeps its input in ``ctx.tensors``, which non-reentrant checkpointing
    cannot drop. At the end of the forward pass (the loss computed, backward not begun) no 8-bit layer may hold
    its input any more, checkpointing must be on, and training must still reach every adapter tensor."""
    import gc
    import weakref

    import bitsandbytes
    from bitsandbytes.autograd._functions import MatMul8bitLt

    from flowertune_llm.training import data, models, sft

    held: list[weakref.ref] = []

    def gpu_matmul(A, B, out=None, state=None, threshold=0.0, bias=None):  # bitsandbytes.matmul's signature
        output = MatMul8bitLt.apply(A, B, out, bias, state)
        kept = getattr(output.grad_fn, "tensors", (None, None, None))[2]
        if kept is not None:
            held.append(weakref.ref(kept))
        return output

    monkeypatch.setattr(bitsandbytes, "matmul", gpu_matmul)
    at_backward: list[tuple[int, bool]] = []
    compute_loss = sft.RoundTrainer.compute_loss

    def counting_compute_loss(self, model, *args, **kwargs):
        result = compute_loss(self, model, *args, **kwargs)
        gc.collect()
        at_backward.append((sum(ref() is not None for ref in held), model.is_activation_checkpointing))
        return result

    monkeypatch.setattr(sft.RoundTrainer, "compute_loss", counting_compute_loss)
    config = make_config(**{"model.quantization": 8, "model.dtype": "bfloat16", "model.gradient-checkpointing": True,
                            "train.training-arguments.max-steps": 1})  # fmt: skip
    model, tokenizer = models.build_peft_model(config.model), models.load_tokenizer(config.model)
    dataset = data.load_partition(config.dataset, config.partition, config.train.seed, 0, 4)

    def one_round(server_round: int) -> tuple[int, bool]:
        held.clear()
        at_backward.clear()
        before = models.get_adapter_state(model)
        sft.train_round(model, tokenizer, dataset, config.train, config.model, 1e-3, server_round)
        after = models.get_adapter_state(model)
        assert all(not torch.equal(before[k], after[k]) for k in before)  # gradients reach every adapter tensor
        return at_backward[0]

    assert one_round(1) == (0, True)
    # The same round with transformers' default (non-reentrant) checkpointing: every 8-bit layer's input stays.
    monkeypatch.setattr(sft, "checkpointing_kwargs", lambda model_config: None)
    kept, checkpointing = one_round(2)
    assert checkpointing and kept == sum(isinstance(m, bitsandbytes.nn.Linear8bitLt) for m in model.modules())
