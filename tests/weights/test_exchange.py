"""What a run exchanges: an adapter (one PEFT file) or a whole model (shards), cut into the same groups."""

from __future__ import annotations

import json

import torch
from peft import PeftConfig

from flowertune_llm.training import models
from flowertune_llm.weights.exchange import Exchange
from flowertune_llm.weights.tensors import specs_of

from conftest import make_config, model_state


def test_an_adapter_is_one_peft_file_with_its_config_in_as_many_groups_as_the_budget_needs(tmp_path):
    config = make_config(**{"aggregation.max-message-mb": 2 / 1024})
    state = models.get_adapter_state(models.build_peft_model(config.model))
    exchange = Exchange.for_adapter(config, specs_of(state), models.lora_config(config.model))
    assert exchange.label == "adapter" and len(exchange.groups) > 1
    assert list(dict.fromkeys(p.name for g in exchange.groups for p in g)) == list(state)  # every tensor, in order
    assert exchange.group_keys(0) == [p.key for p in exchange.groups[0]]
    target = exchange.write(tmp_path / "round-0", state)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = PeftConfig.from_pretrained(target)
    assert saved.r == config.model.lora.peft_lora_r and set(saved.target_modules) == {"q_proj", "v_proj"}
    assert "adapter weights: 8 tensors" in exchange.describe() and f"in {len(exchange.groups)} group(s)" in exchange.describe()


def test_all_at_once_is_one_group_whatever_the_size():
    config = make_config(**{"aggregation.mode": "all_at_once"})
    state = model_state(torch.bfloat16)
    exchange = Exchange.for_full_model(config, specs_of(state), {"config.json": b"{}"})
    assert len(exchange.groups) == 1 and exchange.label == "model"


def test_a_full_model_is_written_sharded_with_its_config_files(tmp_path):
    config = make_config(**{"aggregation.max-message-mb": 0.5 / 1024})
    state = model_state(torch.bfloat16)
    exchange = Exchange.for_full_model(config, specs_of(state), {"config.json": b'{"model_type": "llama"}'})
    exchange = Exchange(**{**exchange.__dict__, "max_shard_bytes": 600})  # several shards, for the test
    target = exchange.write(tmp_path / "round-1", state)
    names = sorted(p.name for p in target.iterdir())
    assert "config.json" in names and "model.safetensors.index.json" in names
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and len(set(index["weight_map"].values())) > 1
    assert exchange.layout.total_bytes == sum(p.stat().st_size for p in target.iterdir() if p.name != "config.json")
