"""Adapters in and out of a model, through a checkpoint and back into PEFT; one local round on 4-bit."""

import os

import numpy as np
import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from flowertune_llm.training import data, models, sft
from flowertune_llm.weights.exchange import Exchange
from flowertune_llm.weights.tensors import specs_of

from conftest import make_config


def _randomized(state, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in state.items()}


def test_adapter_state_round_trip(tiny_config):
    model = models.build_peft_model(tiny_config.model)
    state = models.get_adapter_state(model)
    assert all(v.dtype == torch.float32 for v in state.values())
    # LoRA r=4 on q_proj (128->128) and v_proj (128->64) in 2 layers: r * (in + out) floats per module.
    assert sum(v.numel() for v in state.values()) == 2 * 4 * ((128 + 128) + (128 + 64))
    new_state = _randomized(state)
    models.set_adapter_state(model, new_state)
    for key, value in models.get_adapter_state(model).items():
        torch.testing.assert_close(value, new_state[key], rtol=0, atol=0)


def test_partial_or_foreign_adapter_state_is_refused(tiny_config):
    model = models.build_peft_model(tiny_config.model)
    state = models.get_adapter_state(model)
    first = next(iter(state))
    with pytest.raises(ValueError, match="lacks 1 of"):
        models.set_adapter_state(model, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match="tensors this model lacks"):
        models.set_adapter_state(model, {**state, "base_model.model.extra.lora_A.weight": torch.zeros(1)})


def test_dora_adds_one_magnitude_vector_per_wrapped_module():
    config = make_config(**{"model.lora.use-dora": True})
    state = models.get_adapter_state(models.build_peft_model(config.model))
    magnitudes = [k for k in state if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 2 * 2  # q_proj and v_proj in 2 layers


def test_checkpoint_loads_with_peft_from_another_directory(tiny_config, tmp_path, monkeypatch):
    model = models.build_peft_model(tiny_config.model)
    state = _randomized(models.get_adapter_state(model), seed=1)
    models.set_adapter_state(model, state)
    exchange = Exchange.for_adapter(tiny_config, specs_of(state), models.lora_config(tiny_config.model))
    checkpoint = exchange.write(tmp_path / "round-1", state)
    assert sorted(os.listdir(checkpoint)) == ["adapter_config.json", "adapter_model.safetensors"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tokens = torch.tensor([[1, 5, 9, 13, 2]])
    expected = model(input_ids=tokens).logits

    auto = AutoPeftModelForCausalLM.from_pretrained(str(checkpoint))
    torch.testing.assert_close(auto(input_ids=tokens).logits, expected)
    base = AutoModelForCausalLM.from_pretrained(models.resolve_model_path(tiny_config.model.name))
    explicit = PeftModel.from_pretrained(base, str(checkpoint))
    torch.testing.assert_close(explicit(input_ids=tokens).logits, expected)


def test_a_4bit_round_on_cpu_keeps_a_float32_adapter_and_no_stray_hooks():
    config = make_config(
        **{"model.quantization": 4, "model.dtype": "bfloat16", "model.gradient-checkpointing": True}
    )
    model, tokenizer, cache_hit = models.cached_peft_model(config.model)
    assert not cache_hit
    dataset = data.load_partition(config.dataset, config.partition, config.train.seed, 0, 4)
    for server_round in (1, 2):
        before = models.get_adapter_state(model)
        result = sft.train_round(model, tokenizer, dataset, config.train, config.model, 1e-3, server_round)
        assert np.isfinite(result.train_loss)
        assert result.steps == 2 and result.tokens > 0 and 0 < result.step_seconds <= result.seconds
        after = models.get_adapter_state(model)
        # SFTTrainer casts a quantized model's adapter to bf16; the exchanged adapter must stay float32.
        assert {v.dtype for v in after.values()} == {torch.float32}
        # Gradients reach every adapter tensor in every round (checkpointing needs its input-grad hook each time).
        assert all(not torch.equal(before[k], after[k]) for k in before)
        assert not model.get_input_embeddings()._forward_hooks
    assert models.cached_peft_model(config.model)[2]  # second call is a cache hit


def _saved_adapter(tmp_path, **lora):
    from flowertune_llm.training.models import build_peft_model

    config = make_config(**lora)
    build_peft_model(config.model).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize(
    "override, key, message",
    [
        ({"model.lora.peft-lora-r": 8}, "model.lora.peft-lora-r", "has r=4"),
        ({"model.lora.peft-lora-alpha": 16}, "model.lora.peft-lora-alpha", "has lora_alpha=8"),
        ({"model.lora.use-dora": True}, "model.lora.use-dora", "has use_dora=False"),
        ({"model.lora.target-modules": "q_proj,k_proj"}, "model.lora.target-modules", "adapts q_proj,v_proj"),
    ],
)
def test_a_warm_start_adapter_unlike_the_runs_is_refused_naming_the_key(tmp_path, override, key, message):
    from flowertune_llm.config import ConfigError
    from flowertune_llm.training.models import check_init_adapter

    adapter = _saved_adapter(tmp_path)
    with pytest.raises(ConfigError, match=message) as error:
        check_init_adapter(make_config(**{"model.init-adapter": str(adapter), **override}).model)
    assert error.value.key == key


def test_a_warm_start_that_is_no_adapter_is_named(tmp_path):
    from flowertune_llm.config import ConfigError
    from flowertune_llm.training.models import check_init_adapter

    with pytest.raises(ConfigError, match="not a PEFT adapter directory") as error:
        check_init_adapter(make_config(**{"model.init-adapter": str(tmp_path)}).model)
    assert error.value.key == "model.init-adapter"


def test_a_warm_start_adapter_loads_as_float32_in_the_runs_keys(tmp_path):
    from flowertune_llm.training.models import build_peft_model, get_adapter_state, load_init_adapter

    adapter = _saved_adapter(tmp_path)
    config = make_config(**{"model.init-adapter": str(adapter)})
    expected = specs_of(get_adapter_state(build_peft_model(config.model)))
    state = load_init_adapter(config.model, expected)
    assert specs_of(state) == expected
