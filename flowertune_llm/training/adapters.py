"""A trained adapter on disk, checked before anything loads it: its config, its weights' file, its base model."""

from __future__ import annotations

import json
from pathlib import Path

from flowertune_llm.weights.tensors import read_file_header


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded; the message names the file."""


def check_adapter(peft_path: Path, base_model: str | None) -> str:
    """The adapter's files are there and readable; returns the base model to load."""
    config_path = peft_path / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(f"--peft-path {peft_path}: no adapter_config.json (expected <run dir>/checkpoints/round-N)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{config_path}: not valid JSON ({error.msg})") from None
    weights = peft_path / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterError(f"--peft-path {peft_path}: no adapter_model.safetensors")
    header, data_start = read_file_header(weights)  # a truncated or corrupt file is named here
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + end != weights.stat().st_size:
        raise AdapterError(f"{weights}: {weights.stat().st_size} bytes, its header describes {data_start + end} (truncated?)")
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{config_path}: no base_model_name_or_path; give --base-model")
    from flowertune_llm.training.models import resolve_model_path  # the training stack: only now it is needed

    return resolve_model_path(base)
