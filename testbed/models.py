"""Small models with random weights, built in a second, for real runs of whole-model aggregation."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# 3 layers, 30 tensors, 0.33 MiB in bf16; saved by transformers (tensors in name order), it makes 11 groups
# at aggregation.max-message-mb=0.04.
SMALL_LLAMA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   num_hidden_layers=3, vocab_size=500, tie_word_embeddings=False)  # fmt: skip


def small_llama(directory: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A 3-layer Llama with random weights (``seed``), saved in ``dtype`` as a model directory."""
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).to(dtype).save_pretrained(directory)
    return directory


def aggregation_only_run(model_dir: Path, mode: str, output_dir: Path, extra: str = "", max_message_mb: float = 0.1) -> str:
    """The run config of a 2-round aggregation-only run of the whole model at ``model_dir``."""
    return (
        f"model.name='{model_dir}' model.quantization=0 train.training-arguments.max-steps=0 num-server-rounds=2 "
        f"strategy.fraction-train=1.0 aggregation.mode='{mode}' aggregation.max-message-mb={max_message_mb} "
        f"output.dir='{output_dir}' {extra}"
    ).strip()
