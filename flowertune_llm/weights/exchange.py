"""What a round moves between server and nodes, and how it is cut into messages.

Two kinds of weights are exchanged:

* the **adapter** (LoRA/DoRA tensors): every training run, and aggregation-only runs of a quantized model;
* the **full model** (every tensor of the checkpoint, at its stored width): aggregation-only runs
  (``max-steps=0``) of an unquantized model, the 70B validation run. Each node already holds the base
  model, so round 1 sends nothing down; the server never loads the model, only its safetensors headers.

The plan (:func:`~flowertune_llm.weights.groups.plan_groups`) is made once per run from the tensors' shapes:
``all_at_once`` is one group, ``layerwise`` groups of at most ``aggregation.max-message-mb``. Server and
nodes name pieces by the same keys, so a node serves exactly what the server asks for.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig

from flowertune_llm.config import RunConfig
from flowertune_llm.units import MiB
from flowertune_llm.weights.groups import group_specs, plan_groups
from flowertune_llm.weights.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    FILENAME_PATTERN,
    ONE_FILE,
    CheckpointLayout,
    ShardedCheckpointWriter,
)
from flowertune_llm.weights.tensors import Piece, TensorSpec

ADAPTER_FILENAME_PATTERN = "adapter_model{suffix}.safetensors"


@dataclass(frozen=True)
class Exchange:
    kind: str  # "adapter" | "full"
    specs: dict[str, TensorSpec]
    groups: list[list[Piece]]
    checkpoint_files: dict[str, bytes]  # written beside the weights: adapter_config.json, or config.json
    filename_pattern: str
    max_shard_bytes: int

    @property
    def label(self) -> str:
        return "adapter" if self.kind == "adapter" else "model"

    @property
    def layout(self) -> CheckpointLayout:
        return CheckpointLayout.plan(self.specs, self.max_shard_bytes, filename_pattern=self.filename_pattern)

    def writer(self, target: Path) -> ShardedCheckpointWriter:
        """A writer of a checkpoint in this exchange's layout, its config files included at commit."""
        writer = ShardedCheckpointWriter(
            target, self.specs, max_shard_bytes=self.max_shard_bytes, filename_pattern=self.filename_pattern
        )
        for name, content in self.checkpoint_files.items():
            writer.add_file(name, content)
        return writer

    def write(self, target: Path, state: Mapping[str, torch.Tensor]) -> Path:
        """Write a whole state (the initial adapter) as a checkpoint in this exchange's layout."""
        with self.writer(target) as writer:
            for name, tensor in state.items():
                writer.write(name, tensor)
        return target

    def group_keys(self, index: int) -> list[str]:
        return [piece.key for piece in self.groups[index]]

    @classmethod
    def for_adapter(cls, config: RunConfig, specs: Mapping[str, TensorSpec], peft_config: PeftConfig) -> Exchange:
        return cls(
            kind="adapter",
            specs=dict(specs),
            groups=plan_groups(specs, config.aggregation.max_message_bytes),
            checkpoint_files={"adapter_config.json": _adapter_config_json(peft_config)},
            filename_pattern=ADAPTER_FILENAME_PATTERN,
            max_shard_bytes=ONE_FILE,  # PEFT reads a single adapter file, never shards
        )

    @classmethod
    def for_full_model(cls, config: RunConfig, specs: Mapping[str, TensorSpec], files: Mapping[str, bytes]) -> Exchange:
        return cls(
            kind="full",
            specs=dict(specs),
            groups=plan_groups(specs, config.aggregation.max_message_bytes),
            checkpoint_files=dict(files),
            filename_pattern=FILENAME_PATTERN,
            max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
        )

    def describe(self) -> str:
        total = sum(spec.nbytes for spec in self.specs.values())
        largest = max((sum(s.nbytes for s in group_specs(g, self.specs).values()) for g in self.groups), default=0)
        return (
            f"{'adapter' if self.kind == 'adapter' else 'full-model'} weights: {len(self.specs)} tensors, {total / MiB:.1f} MiB "
            f"in {len(self.groups)} group(s), the largest {largest / MiB:.1f} MiB"
        )


def _adapter_config_json(peft_config: PeftConfig) -> bytes:
    # PEFT's own writer, so the file holds what PeftModel.save_pretrained would write, but for one thing: PEFT
    # keeps target_modules as a set and writes it in the process's string-hash order, which differs from run
    # to run; sorted (a set has no order to lose), two runs of one config write the same bytes.
    with tempfile.TemporaryDirectory() as scratch:
        peft_config.save_pretrained(scratch)
        saved = json.loads((Path(scratch) / "adapter_config.json").read_text())
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(saved.get(key), list):
            saved[key] = sorted(saved[key])
    return json.dumps(saved, indent=2, sort_keys=True).encode()  # PEFT's own layout
