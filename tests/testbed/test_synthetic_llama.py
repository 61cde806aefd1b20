"""The 70B-shaped synthetic Llama the memory benchmark builds: loadable, deterministic, the right shapes."""

from __future__ import annotations

import pytest
import torch

from flowertune_llm.weights.tensors import TensorSpec

from conftest import files_of


def test_synthetic_llama_is_a_loadable_llama_written_in_chunks(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from testbed import synthetic_llama as synthetic
    shapes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=200)
    summary = synthetic.build(tmp_path / "m", layers=2, seed=3, chunk_bytes=1024, max_shard_bytes=8000, **shapes)
    assert summary["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "m").iterdir())
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert config.model_type == "llama" and config.num_hidden_layers == 2 and config.hidden_size == 32
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.float().std().item() == pytest.approx(0.02, rel=0.1)
    synthetic.build(tmp_path / "again", layers=2, seed=3, chunk_bytes=1024, max_shard_bytes=8000, **shapes)
    assert files_of(tmp_path / "m") == files_of(tmp_path / "again")  # same seed, same bytes
    synthetic.build(tmp_path / "other", layers=2, seed=4, chunk_bytes=1024, max_shard_bytes=8000, **shapes)
    assert files_of(tmp_path / "m") != files_of(tmp_path / "other")


def test_synthetic_llama_has_the_70b_shapes():
    from testbed import synthetic_llama as synthetic
    specs = synthetic.tensor_specs(synthetic.llama_config(1))
    assert specs["model.embed_tokens.weight"] == TensorSpec((128256, 8192), torch.bfloat16)
    assert specs["model.layers.0.self_attn.k_proj.weight"].shape == (1024, 8192)
    assert specs["model.layers.0.mlp.down_proj.weight"].shape == (8192, 28672)
    layer = sum(s.nbytes for n, s in specs.items() if n.startswith("model.layers.0."))
    assert layer == 1_711_308_800  # 1.6 GiB per decoder layer in bf16
