"""Compressed updates (``exchange.update-format``, config/run.py): a piece's change from a global model, in
fewer bytes.

``float32`` sends weights as they are (no codec). ``bfloat16`` and ``int8`` send the change ``d = w - g``
from the global model ``g`` both ends hold, and the receiver rebuilds ``g + decode(encode(d))``:

* ``bfloat16``: ``d`` rounded to bf16 (nearest even); 2 bytes per weight, 0.5x.
* ``int8``: per row of a matrix (its first dimension; the other dimensions flattened), blocks of
  :data:`BLOCK` consecutive values share one float32 scale ``absmax / 127``; each value is
  ``round(d / scale)`` (half to even) in [-127, 127]. 1 byte per weight plus 4 bytes per block: for a LoRA A
  (r x 4096) 0.27x of float32, for a LoRA B (4096 x r, one short block per row) (r + 4) / 4r. Vectors and
  scalars (norms, DoRA magnitudes: a small share of an adapter) go as bfloat16.

Why blocks within rows: a tensor larger than a layer-wise group is cut into row ranges
(weights/groups.py), so blocks that never cross a row are the same however the model is grouped, and
layer-wise and all-at-once rounds send and rebuild the same bits. Decoding is one multiply per value and
rebuilding one add, both in float32, identical on the server and on every node: the global model a node
rebuilds from a change is the server's checkpoint, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.shards import ONE_FILE, ShardedCheckpointWriter, StoreInsideCheckpoint
from flowertune_llm.weights.tensors import Piece, TensorSpec

BLOCK = 64  # values per int8 scale: bitsandbytes' block size for its 4-bit formats
SCALE_SUFFIX = "::scale"  # the int8 scales of piece ``<key>`` travel as ``<key>::scale``
_ROWS_PER_CHUNK_ELEMENTS = 1 << 20  # encode a piece in chunks of rows: bounded scratch for any tensor size


def _quantized(spec: TensorSpec, update_format: str) -> bool:
    return update_format == "int8" and len(spec.shape) >= 2


def _blocks(columns: int) -> int:
    return -(-columns // BLOCK)


def wire_specs(key: str, spec: TensorSpec, update_format: str) -> dict[str, TensorSpec]:
    """What piece ``key`` (of ``spec``) travels as."""
    if update_format == "float32":
        return {key: spec}
    if not _quantized(spec, update_format):
        return {key: TensorSpec(spec.shape, torch.bfloat16)}
    rows, columns = spec.shape[0], spec.numel // spec.shape[0] if spec.shape[0] else 0
    return {key: TensorSpec(spec.shape, torch.int8), key + SCALE_SUFFIX: TensorSpec((rows, _blocks(columns)), torch.float32)}


def encode(key: str, change: torch.Tensor, update_format: str) -> dict[str, torch.Tensor]:
    """``change`` (float32) of piece ``key`` in ``update_format`` (bfloat16 or int8)."""
    if not _quantized(TensorSpec.of(change), update_format):
        return {key: change.to(torch.bfloat16)}
    rows = change.shape[0]
    flat = change.reshape(rows, -1)
    columns = flat.shape[1]
    blocks = _blocks(columns)
    values = torch.empty(flat.shape, dtype=torch.int8)
    scales = torch.empty((rows, blocks), dtype=torch.float32)
    per_chunk = max(1, _ROWS_PER_CHUNK_ELEMENTS // max(1, blocks * BLOCK))
    for start in range(0, rows, per_chunk):
        stop = min(start + per_chunk, rows)
        padded = torch.zeros((stop - start, blocks * BLOCK), dtype=torch.float32)
        padded[:, :columns] = flat[start:stop]
        grouped = padded.view(stop - start, blocks, BLOCK)
        scale = grouped.abs().amax(dim=2).div_(127.0)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block: every value 0
        quantized = grouped.div(safe.unsqueeze(2)).round_().clamp_(-127, 127).to(torch.int8)
        values[start:stop] = quantized.view(stop - start, blocks * BLOCK)[:, :columns]
        scales[start:stop] = scale
    return {key: values.view(change.shape), key + SCALE_SUFFIX: scales}


def decode(key: str, wire: Mapping[str, torch.Tensor], spec: TensorSpec, update_format: str) -> torch.Tensor:
    """The float32 change of piece ``key`` (of ``spec``) from what it travelled as; a malformed one raises
    ValueError naming the tensor."""
    expected = wire_specs(key, spec, update_format)
    for name, wanted in expected.items():
        got = wire.get(name)
        if got is None:
            raise ValueError(f"{name}: missing from an update in {update_format}")
        if TensorSpec.of(got) != wanted:
            raise ValueError(f"{name} is {TensorSpec.of(got).describe()}, expected {wanted.describe()} ({update_format})")
    if not _quantized(spec, update_format):
        return wire[key].to(torch.float32)
    values, scales = wire[key], wire[key + SCALE_SUFFIX]
    rows = spec.shape[0]
    flat = values.reshape(rows, -1)
    columns = flat.shape[1]
    out = torch.empty(flat.shape, dtype=torch.float32)
    per_chunk = max(1, _ROWS_PER_CHUNK_ELEMENTS // max(1, columns))
    for start in range(0, rows, per_chunk):
        stop = min(start + per_chunk, rows)
        spread = scales[start:stop].repeat_interleave(BLOCK, dim=1)[:, :columns]
        torch.mul(flat[start:stop].to(torch.float32), spread, out=out[start:stop])
    return out.view(spec.shape)


def rebuild(base: torch.Tensor, wire: Mapping[str, torch.Tensor], key: str, update_format: str) -> torch.Tensor:
    """``base + decode(wire)`` in float32: the weights a change was taken from, changed."""
    change = decode(key, wire, TensorSpec(tuple(base.shape), torch.float32), update_format)
    return change.add_(base.to(torch.float32))


# --- groups of pieces: a node's update up, the server's change down ------------------------------------------


def encode_group(update: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], update_format: str) -> dict[str, torch.Tensor]:
    """A group's change from ``base`` (the global model the node received), keyed by piece, to send up."""
    wire: dict[str, torch.Tensor] = {}
    for key, tensor in update.items():
        wire.update(encode(key, tensor.to(torch.float32, copy=True).sub_(base[key].to(torch.float32)), update_format))
    return wire


def rebuild_group(wire: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], update_format: str) -> dict[str, torch.Tensor]:
    """``base`` (a group of the global model, piece by piece) changed by ``wire``, in ``base``'s dtypes; a
    malformed ``wire`` raises ValueError naming the tensor."""
    expected = {name for key, tensor in base.items() for name in wire_specs(key, TensorSpec.of(tensor), update_format)}
    unexpected = sorted(set(wire) - expected)
    if unexpected:
        raise ValueError(f"{unexpected[0]}: not a tensor of this group in {update_format}")
    return {key: rebuild(tensor, wire, key, update_format).to(tensor.dtype) for key, tensor in base.items()}


def piece_keys(wire: Mapping[str, torch.Tensor]) -> list[str]:
    """The pieces a group's wire tensors are of (each piece has one tensor under its own key)."""
    return [key for key in wire if not key.endswith(SCALE_SUFFIX)]


CHANGE_DIR = "global_change"  # inside each checkpoint of a compressed run: the change from the previous one


def _stored_piece(wire_key: str) -> Piece:
    """Where a piece's wire tensor lies in the change store: the whole tensor's wire name, the piece's rows."""
    suffix = SCALE_SUFFIX if wire_key.endswith(SCALE_SUFFIX) else ""
    piece = Piece.parse(wire_key.removesuffix(suffix))
    return Piece(piece.name + suffix, piece.rows)


def stored_change(store: LocalCheckpoint, group: Sequence[Piece], specs: Mapping[str, TensorSpec], update_format: str) -> dict[str, torch.Tensor]:
    """A group of a stored change (``global_change/`` of a checkpoint), keyed as it travels."""
    out = {}
    for piece in group:
        for wire_key in wire_specs(piece.key, piece.spec(specs[piece.name]), update_format):
            out[wire_key] = store.tensor(_stored_piece(wire_key))
    return out


class ChangeRound(StoreInsideCheckpoint):
    """The round's new global model as a change from the one before, for nodes that hold that one.

    Applied to each piece's new weights as the round's last step (after a server optimizer's): the change
    from the global model before the round is encoded, stored in ``global_change/`` of the round's
    checkpoint (what later goes down to nodes holding the earlier model), and the global model becomes the
    earlier one changed by the *decoded* change: what those nodes rebuild, bit for bit.
    """

    DIRECTORY = CHANGE_DIR

    def __init__(self, update_format: str, specs: Mapping[str, TensorSpec], before: LocalCheckpoint):
        super().__init__()
        self.update_format, self.specs, self.before = update_format, dict(specs), before

    def _writer_for(self, directory: Path) -> ShardedCheckpointWriter:
        store = {name: wire for n, s in self.specs.items() for name, wire in wire_specs(n, s, self.update_format).items()}
        return ShardedCheckpointWriter(directory, store, max_shard_bytes=ONE_FILE)

    def __call__(self, key: str, values: torch.Tensor) -> torch.Tensor:
        writer = self._open_writer()
        base = self.before.tensor(Piece.parse(key)).to(torch.float32)
        wire = encode(key, values.to(torch.float32).sub(base), self.update_format)
        for wire_key, tensor in wire.items():
            writer.write(_stored_piece(wire_key), tensor)
        return rebuild(base, wire, key, self.update_format).to(values.dtype)
