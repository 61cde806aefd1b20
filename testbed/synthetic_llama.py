"""A Llama with Llama-3.1-70B's shapes and only K decoder layers, random bf16, written straight to disk.

For benchmarking layer-wise aggregation on a machine with far less memory than the model: one 70B decoder
layer is 1.7 GB in bf16 and the embedding and LM head 2.1 GB each, so the model is never held in memory.
Tensor names, shapes and order come from ``transformers``' own ``LlamaForCausalLM`` built on the meta device
(no memory), and every tensor is generated in row chunks of ``--chunk-mb`` and written to its place in the
sharded safetensors output (:class:`flowertune_llm.weights.shards.ShardedCheckpointWriter`, atomic, disk space checked
first). ``config.json`` is a ``LlamaConfig`` with ``num_hidden_layers=K``, so ``AutoConfig`` and
``AutoModelForCausalLM.from_pretrained`` recognise the directory. Same ``--seed``, same bytes; use several
seeds for several clients.

Usage (from the repository root)::

    python -m testbed.synthetic_llama --layers 1 --out /tmp/llama70b-1layer [--seed 0] [--max-shard-gb 5]

Prints a JSON summary (seconds, bytes on disk, files).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flowertune_llm.weights.shards import DEFAULT_MAX_SHARD_BYTES, ShardedCheckpointWriter
from flowertune_llm.weights.tensors import Piece, TensorSpec

# Llama-3.1-70B (meta-llama/Llama-3.1-70B config.json), except the layer count.
LLAMA_31_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3",
    },
    bos_token_id=128000,
    eos_token_id=128001,
    tie_word_embeddings=False,
)  # fmt: skip
INIT_STD = 0.02  # Llama's initializer_range


def random_weights(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Uniform weights with standard deviation INIT_STD (a uniform init, as ``nn.Linear``'s default is).

    Random 16-bit integers scaled, not ``torch.randn``: on this 2-core CPU randn makes ~35 M values/s and
    this ~75 M/s, which halves the build time of a 3-billion-parameter model. The distribution does not
    matter for aggregation; what matters is that values are finite, varied and never repeat at Flower's
    5 MiB chunk size (identical chunks are sent once and would flatter a benchmark).
    """
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1, generator=generator)
    values = words.view(torch.int16)[:numel].to(torch.float32)  # uniform on [-32768, 32767]
    return values.mul_(INIT_STD * math.sqrt(12) / 65536).to(dtype).view(shape)


def llama_config(layers: int, dtype: torch.dtype = torch.bfloat16, **overrides: object) -> LlamaConfig:
    settings = {**LLAMA_31_70B, **overrides, "num_hidden_layers": layers}
    for token in ("bos_token_id", "eos_token_id"):  # a shrunken test vocabulary lacks Llama 3's special ids
        if settings[token] >= settings["vocab_size"]:
            settings[token] = None
    config = LlamaConfig(**settings)
    config.dtype = dtype  # written as "dtype" in config.json, what from_pretrained uses by default
    return config


def tensor_specs(config: LlamaConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """Every parameter's name and shape, in the model's order, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: TensorSpec(tuple(p.shape), dtype) for name, p in model.state_dict().items()}


def build(
    out: Path | str,
    layers: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    chunk_bytes: int = 256 * 1024**2,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    **overrides: object,
) -> dict[str, object]:
    """Write the synthetic model to ``out``; returns a summary. Peak memory is about 4x ``chunk_bytes`` (bf16)."""
    start = time.perf_counter()
    config = llama_config(layers, dtype, **overrides)
    specs = tensor_specs(config, dtype)
    with ShardedCheckpointWriter(out, specs, max_shard_bytes=max_shard_bytes) as writer:
        for index, (name, spec) in enumerate(specs.items()):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            if name.endswith("norm.weight"):  # RMSNorm scales start at 1 in Llama
                writer.write(name, torch.ones(spec.shape, dtype=dtype))
                continue
            rows = spec.shape[0]
            per_chunk = max(1, chunk_bytes // max(1, spec.nbytes // rows))
            for row in range(0, rows, per_chunk):
                stop = min(row + per_chunk, rows)
                writer.write(Piece(name, (row, stop)), random_weights((stop - row, *spec.shape[1:]), generator, dtype))
        writer.add_file("config.json", config.to_json_string(use_diff=False))
    files = sorted(Path(out).iterdir())
    return {
        "out": str(out),
        "layers": layers,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": len(specs),
        "parameters": sum(spec.numel for spec in specs.values()),
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "files": [f.name for f in files],
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, required=True, help="decoder layers (70B has 80)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9)
    parser.add_argument("--chunk-mb", type=int, default=256, help="rows generated at a time, in MiB")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {LLAMA_31_70B[key]}")
    args = parser.parse_args(argv)
    overrides = {
        key: getattr(args, key)
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
        if getattr(args, key) is not None
    }
    summary = build(
        args.out, args.layers, seed=args.seed, dtype=getattr(torch, args.dtype),
        chunk_bytes=args.chunk_mb * 1024**2, max_shard_bytes=int(args.max_shard_gb * 1e9), **overrides,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
