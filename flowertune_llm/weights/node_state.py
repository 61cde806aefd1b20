"""A node's weights between the messages of a round, kept on the node's own disk.

A layer-wise round reaches a node as several messages: groups of the global model coming down, the train
instruction, then requests for groups of the node's update going up. Flower hands each to whichever
process it picks (any simulation actor, or a fresh ClientApp process per message in deployment), so
nothing survives between messages in memory. What a node received is written, group by group, to
safetensors files under its state directory; its update after training too; and every group it sends up
is read back from those files through mmap, so the node never holds a second materialized copy.

    <state-dir>/node-<id>/
        run                               the run these files belong to (another run's are removed)
        round-<r>/received/manifest.json  every tensor's shape and dtype, from the server
        round-<r>/received/group-<g>-of-<G>/model.safetensors
        round-<r>/update/                 the node's trained update (a safetensors checkpoint)
        round-<r>/source.json             what this round's groups are served from
        eval-<r>/received/...             round r's new global model, sent for federated evaluation
        held/                             with compressed updates: the last global model received whole
                                          (hard links to its received files) and its round, held.json

Only one phase's files are kept at a time: beginning one (training round r, or evaluating its result)
drops the others, a global model's worth of disk each. With compressed updates (weights/codec.py) the
node keeps the last global model it received in ``held/``: the next one may come as a change from it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from flowertune_llm import builtin
from flowertune_llm.atomic import write_atomic, write_json
from flowertune_llm.weights.codec import piece_keys, rebuild_group
from flowertune_llm.weights.disk import check_disk_space
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.shards import ONE_FILE, ShardedCheckpointWriter, save_local_checkpoint
from flowertune_llm.weights.tensors import Piece, TensorSpec, specs_from_json, specs_of, specs_to_json

TRAIN, EVAL = "round", "eval"  # the two phases a node holds weights for


class WeightSource(Protocol):
    """Where a node's groups are read from: its own checkpoint, its update, or what the server sent."""

    specs: dict[str, TensorSpec]

    def group(self, keys: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def __enter__(self) -> WeightSource: ...

    def __exit__(self, *exc: object) -> None: ...


class ReceivedGroups:
    """The groups of a global model a node received, served by piece key through mmap."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.specs = specs_from_json((directory / "manifest.json").read_text())
        self.files = sorted(directory.glob("group-*/*.safetensors"))
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> ReceivedGroups:
        for file in self.files:
            handle = safe_open(str(file), framework="pt")
            self._handles.update({key: handle for key in handle.keys()})
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles = {}

    def group(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        missing = [key for key in keys if key not in self._handles]
        if missing:
            raise KeyError(f"{missing[0]}: not among the groups this node received ({self.directory})")
        return {key: self._handles[key].get_tensor(key) for key in keys}

    def state(self) -> dict[str, torch.Tensor]:
        """Whole tensors (row ranges of a split tensor concatenated), in manifest order."""
        pieces: dict[str, list[tuple[int, str]]] = {}
        for key in self._handles:
            piece = Piece.parse(key)
            pieces.setdefault(piece.name, []).append((piece.rows[0] if piece.rows else 0, key))
        state = {}
        for name in self.specs:
            parts = [self._handles[key].get_tensor(key) for _, key in sorted(pieces[name])]
            state[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return state


class NodeState:
    """One node's round files (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def open(cls, run_id: int, node_id: int, state_dir: Path | None = None) -> NodeState:
        """The node's round files under ``state_dir`` (node config ``state-dir``; default: the package cache)."""
        base = state_dir or builtin.cache_root() / "node-state"
        root = base.expanduser().resolve() / f"node-{node_id}"
        marker = root / "run"
        if not marker.is_file() or marker.read_text() != str(run_id):
            shutil.rmtree(root, ignore_errors=True)  # another run's weights: possibly a whole model's worth
            root.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, str(run_id).encode())
        return cls(root)

    def _round(self, server_round: int, phase: str = TRAIN) -> Path:
        return self.root / f"{phase}-{server_round}"

    def begin_round(self, server_round: int, phase: str = TRAIN) -> None:
        """Drop every other round's and phase's files: from here on only these are served."""
        for old in (*self.root.glob(f"{TRAIN}-*"), *self.root.glob(f"{EVAL}-*")):
            if old != self._round(server_round, phase):
                shutil.rmtree(old, ignore_errors=True)
        self._round(server_round, phase).mkdir(parents=True, exist_ok=True)

    def receive(
        self,
        server_round: int,
        index: int,
        total: int,
        tensors: Mapping[str, torch.Tensor],
        manifest: Mapping[str, TensorSpec] | None,
        phase: str = TRAIN,
    ) -> None:
        """Store group ``index`` of ``total`` of the global model (the manifest comes with group 0)."""
        directory = self._round(server_round, phase) / "received"
        directory.mkdir(parents=True, exist_ok=True)
        if manifest is not None:
            needed = sum(spec.nbytes for spec in manifest.values())
            check_disk_space(directory, needed, what="the global model this node receives")
            write_atomic(directory / "manifest.json", specs_to_json(manifest).encode())
        # Our writer writes each tensor (views of the message's bytes) straight to its place and fsyncs before
        # the rename. Keys are written as they are (Piece(key)): a row range is stored under its own key.
        target = directory / f"group-{index:06d}-of-{total:06d}"
        with ShardedCheckpointWriter(target, specs_of(tensors), max_shard_bytes=ONE_FILE) as writer:
            for key, tensor in tensors.items():
                writer.write(Piece(key), tensor)

    def received(self, server_round: int, phase: str = TRAIN) -> ReceivedGroups | None:
        """What the server sent this round (for this phase), if it all arrived."""
        directory = self._round(server_round, phase) / "received"
        files = sorted(directory.glob("group-*-of-*"))
        if not (directory / "manifest.json").is_file() or not files:
            return None
        total = int(files[0].name.rsplit("-of-", 1)[1])
        if len(files) != total:
            raise RuntimeError(f"received {len(files)} of {total} groups of round {server_round} ({directory})")
        return ReceivedGroups(directory)

    # --- the held global model (compressed updates) ---------------------------------------------------------------

    @property
    def _held(self) -> Path:
        return self.root / "held"

    def hold(self, server_round: int, model_round: int, phase: str = TRAIN) -> None:
        """Keep the global model just received whole (the one made by round ``model_round``) as ``held/``."""
        received = self._round(server_round, phase) / "received"
        scratch = self.root / ".held.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(received, scratch, copy_function=os.link)  # received files are never rewritten
        write_json(scratch / "held.json", {"round": model_round})
        shutil.rmtree(self._held, ignore_errors=True)
        os.replace(scratch, self._held)

    def held_round(self) -> int | None:
        record = self._held / "held.json"
        return json.loads(record.read_text())["round"] if record.is_file() else None

    def _check_held(self, model_round: int) -> None:
        held = self.held_round()
        if held != model_round:
            holds = "no global model" if held is None else f"round {held}'s"
            raise ValueError(f"sent for the global model of round {model_round}, but this node holds {holds}")

    def receive_change(
        self, server_round: int, index: int, total: int, wire: Mapping[str, torch.Tensor],
        manifest: Mapping[str, TensorSpec] | None, update_format: str, base_round: int, phase: str = TRAIN,
    ) -> None:  # fmt: skip
        """Store group ``index`` of the global model, rebuilt from its change from the held model."""
        self._check_held(base_round)
        with ReceivedGroups(self._held) as held:
            tensors = rebuild_group(wire, held.group(piece_keys(wire)), update_format)
        self.receive(server_round, index, total, tensors, manifest, phase)

    def receive_held(self, server_round: int, model_round: int, phase: str = TRAIN) -> None:
        """This round's global model is the held one: every group of it, received without a byte moving."""
        self._check_held(model_round)
        self.begin_round(server_round, phase)
        received = self._round(server_round, phase) / "received"
        shutil.rmtree(received, ignore_errors=True)
        shutil.copytree(self._held, received, copy_function=os.link, ignore=shutil.ignore_patterns("held.json"))

    def save_update(self, server_round: int, state: Mapping[str, torch.Tensor]) -> Path:
        return save_local_checkpoint(state, self._round(server_round) / "update")

    def serve_from(self, server_round: int, path: Path) -> None:
        """Record that this round's groups come from ``path`` (a checkpoint, or the received groups)."""
        write_json(self._round(server_round) / "source.json", {"path": str(path)})

    def source(self, server_round: int) -> WeightSource:
        record = self._round(server_round) / "source.json"
        if not record.is_file():
            raise RuntimeError(f"round {server_round}: asked for weights before the train message ({record})")
        path = Path(json.loads(record.read_text())["path"])
        return ReceivedGroups(path) if (path / "manifest.json").is_file() else LocalCheckpoint(path)
