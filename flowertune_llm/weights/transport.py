"""Model state over Flower messages at each tensor's own width: one safetensors payload per message.

Encoding (:func:`to_record`): a whole state (an adapter, or one group of a model) is **one** Flower
:class:`~flwr.app.Array` whose ``data`` is a safetensors file (``stype="safetensors"``), in an ArrayRecord
under the key ``"safetensors"``. Why one Array and not one per tensor, as Flower's ``ArrayRecord(state_dict)``
makes:

* **Flower moves every Array as separate objects, one RPC each.** In the Deployment Engine a message is
  split into objects (the record, each Array, each Array's 5 MB chunks), and every hop (ServerApp ->
  SuperLink -> SuperNode -> ClientApp and back) pushes and pulls them one request at a time, at most
  ``os.cpu_count()`` in flight. An adapter of 84 small tensors is ~170 objects per hop; on 127.0.0.1 with
  TLS and SuperNode authentication the same 1.3 MB makes a round trip in 5.4 s (median) as one Array and
  8.3 s as 84 (``bench/message_objects.py``). A packed record is 2 objects plus its chunks, and large data
  (a 70B group) is chunk-bound either way.
* **bfloat16 at 2 bytes.** Flower's ``Array(tensor)`` goes through NumPy, which has no bfloat16; safetensors
  stores it natively, as it stores every dtype a checkpoint can hold.
* The format is the one the checkpoints, node state and Hub models already use, self-describing (names,
  dtypes, shapes, offsets), and Flower never interprets it: ``Array.numpy()`` refuses the stype with a
  TypeError rather than misreading it, so a stock Flower FedAvg cannot average our bytes by accident.

Decoding (:func:`from_record`) never goes through float32 and never copies: each tensor is a
``torch.frombuffer`` view of the Array's ``bytes`` at the offsets the safetensors header gives.
``safetensors.torch.load`` would copy every tensor out of the buffer first, a second copy of each
group held on the server while a reply is folded; reading the header (its format is eight bytes of
length, then JSON) is what avoids it. The views keep the bytes alive and must be treated as read-only
(``bytes`` are immutable).

How a model is cut into messages is groups.py's business; it sizes groups with :func:`encoded_size`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import save as safetensors_bytes

from flowertune_llm.weights.tensors import TensorSpec, entry_spec, header_entry, read_header

SAFETENSORS_STYPE = "safetensors"  # Array.data is a safetensors file
RECORD_KEY = "safetensors"  # the one entry of an encoded ArrayRecord


# --- encoding ------------------------------------------------------------------------------------------------

# What a record adds around its tensors, at most: the key, safetensors' 8-byte length, the header's braces and
# its padding to a multiple of 8.
RECORD_OVERHEAD = len(RECORD_KEY) + 8 + 2 + 7
_OFFSET_DIGITS = 20  # room for either data offset, whatever the group's size


def encoded_size(key: str, spec: TensorSpec) -> int:
    """The most one tensor adds to ``ArrayRecord.count_bytes()``: its bytes and its safetensors header entry.

    The entry's offsets depend on the other tensors of the record, so they are counted at their widest;
    a record of ``pieces`` is then at most ``RECORD_OVERHEAD + sum(encoded_size(...))``.
    """
    entry = header_entry(key, spec, 0) | {"data_offsets": [0, 0]}
    header = len(json.dumps({key: entry}, separators=(",", ":"))) - 2 + 1  # without the braces, with a comma
    return spec.nbytes + header + 2 * (_OFFSET_DIGITS - 1)


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``{key: tensor}`` as one safetensors Array, each tensor at its own dtype; one copy, into the bytes."""
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
    data = safetensors_bytes(tensors)
    array = Array(dtype="uint8", shape=(len(data),), stype=SAFETENSORS_STYPE, data=data)
    return ArrayRecord({RECORD_KEY: array})


# --- decoding ------------------------------------------------------------------------------------------------


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` from a record made by :func:`to_record`, in the order of the tensors' bytes.

    Each tensor is a read-only view of the record's bytes. A header that does not
    describe its payload exactly (offsets out of range, overlapping or leaving gaps, a size that does not
    match the shape) is refused: a truncated or padded message is an error, not garbage.
    """
    if list(record) != [RECORD_KEY] or record[RECORD_KEY].stype != SAFETENSORS_STYPE:
        found = {key: array.stype for key, array in record.items()}
        raise ValueError(f"expected one {SAFETENSORS_STYPE!r} Array under {RECORD_KEY!r}, got {found}")
    data = record[RECORD_KEY].data
    header, start = read_header(data)
    entries = sorted(((key, *entry_spec(key, entry)) for key, entry in header.items()), key=lambda e: e[2])
    tensors: dict[str, torch.Tensor] = {}
    position = 0
    for key, spec, (begin, end) in entries:
        dtype, shape, numel = spec.dtype, spec.shape, spec.numel
        if begin != position or end - begin != spec.nbytes or start + end > len(data):
            raise ValueError(
                f"{key}: bytes [{begin}, {end}) do not follow at {position} with {numel} x {dtype} "
                f"within a payload of {len(data) - start}"
            )
        position = end
        if numel == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():
            # bytes are read-only; torch warns that it cannot mark a tensor read-only. The docstring says so.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            tensor = torch.frombuffer(data, dtype=dtype, count=numel, offset=start + begin).view(shape)
        tensors[key] = tensor
    if start + position != len(data):
        raise ValueError(f"safetensors payload is {len(data) - start} bytes, its header describes {position}")
    return tensors
