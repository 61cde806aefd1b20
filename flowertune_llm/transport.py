"""Model state over Flower messages at each tensor's own width, and the plan that cuts a model into messages.

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
(``bytes`` are immutable); pass ``copy=True`` for writable tensors.

Grouping (:func:`plan_groups`) cuts a model into messages of at most ``max_bytes`` as counted by
``ArrayRecord.count_bytes()``, splitting a tensor larger than the budget into row ranges (see there).
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import save as safetensors_bytes

SAFETENSORS_STYPE = "safetensors"  # Array.data is a safetensors file
RECORD_KEY = "safetensors"  # the one entry of an encoded ArrayRecord

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
TORCH_DTYPES = {tag: dtype for dtype, tag in SAFETENSORS_DTYPES.items()}

if sys.byteorder != "little":  # safetensors is little-endian; every platform torch ships for is
    raise ImportError("flowertune_llm.transport assumes a little-endian host")


@dataclass(frozen=True)
class TensorSpec:
    """What must agree between the global model and every update: shape and dtype (the name is the key)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def describe(self) -> str:
        return f"{dtype_name(self.dtype)}{list(self.shape)}"


def specs_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {name: TensorSpec.of(t) for name, t in state.items()}


def specs_to_json(specs: Mapping[str, TensorSpec]) -> str:
    """A manifest that fits in a ConfigRecord string, so a client can be checked before any tensor moves."""
    return json.dumps([[n, dtype_name(s.dtype), list(s.shape)] for n, s in specs.items()])


def specs_from_json(text: str) -> dict[str, TensorSpec]:
    return {n: TensorSpec(tuple(shape), torch_dtype(d)) for n, d, shape in json.loads(text)}


_PIECE_KEY = re.compile(r"^(?P<name>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


@dataclass(frozen=True)
class Piece:
    """A whole tensor (``rows is None``) or the row range ``[start, stop)`` of its first dimension.

    Its :attr:`key` is the name in a record: the tensor's name, or ``name[start:stop]`` for a row range.
    Module paths never contain brackets, so :meth:`parse` recovers the piece from its key.
    """

    name: str
    rows: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        return self.name if self.rows is None else f"{self.name}[{self.rows[0]}:{self.rows[1]}]"

    @classmethod
    def parse(cls, key: str) -> Piece:
        match = _PIECE_KEY.match(key)
        if match is None:
            return cls(key)
        return cls(match["name"], (int(match["start"]), int(match["stop"])))

    def spec(self, whole: TensorSpec) -> TensorSpec:
        """The piece's own shape and dtype, given the whole tensor's."""
        if self.rows is None:
            return whole
        start, stop = self.rows
        if not whole.shape or not 0 <= start < stop <= whole.shape[0]:
            raise ValueError(f"{self.key}: rows out of range for {whole.describe()}")
        return TensorSpec((stop - start, *whole.shape[1:]), whole.dtype)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The piece of ``tensor``: a view (rows of a contiguous tensor are contiguous), never a copy."""
        return tensor if self.rows is None else tensor[self.rows[0] : self.rows[1]]


# --- dtypes --------------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how manifests name a dtype."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unsupported dtype {name!r}")
    return dtype


@cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


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


def header_entry(key: str, spec: TensorSpec, begin: int) -> dict[str, object]:
    """``key``'s entry in a safetensors header, its bytes at ``[begin, begin + spec.nbytes)`` of the data."""
    if spec.dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{key}: safetensors cannot store {spec.dtype}")
    return {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [begin, begin + spec.nbytes]}


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``{key: tensor}`` as one safetensors Array, each tensor at its own dtype; one copy, into the bytes."""
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
    data = safetensors_bytes(tensors)
    array = Array(dtype="uint8", shape=(len(data),), stype=SAFETENSORS_STYPE, data=data)
    return ArrayRecord({RECORD_KEY: array})


# --- decoding ------------------------------------------------------------------------------------------------


def from_record(record: ArrayRecord, *, copy: bool = False) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` from a record made by :func:`to_record`, in the order of the tensors' bytes.

    Each tensor is a view of the record's bytes (``copy=True`` for writable copies). A header that does not
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
        tensors[key] = tensor.clone() if copy else tensor
    if start + position != len(data):
        raise ValueError(f"safetensors payload is {len(data) - start} bytes, its header describes {position}")
    return tensors


def read_header(data: bytes) -> tuple[dict, int]:
    """The safetensors header (without ``__metadata__``) at the start of ``data``, and where the tensor bytes
    start; ``data`` may end there (a file's first ``8 + length`` bytes)."""
    if len(data) < 8:
        raise ValueError(f"safetensors data is {len(data)} bytes, shorter than its length prefix")
    (length,) = struct.unpack_from("<Q", data)
    if 8 + length > len(data):
        raise ValueError(f"safetensors header of {length} bytes does not fit in {len(data)}")
    try:
        header = json.loads(bytes(memoryview(data)[8 : 8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"safetensors header is not valid JSON: {error}") from error
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + length


def entry_spec(key: str, entry: object) -> tuple[TensorSpec, tuple[int, int]]:
    """What a safetensors header entry says: the tensor's shape and dtype, and its data offsets."""
    try:
        dtype = TORCH_DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{key}: malformed safetensors entry {entry!r}") from error
    if any(d < 0 for d in shape):
        raise ValueError(f"{key}: negative dimension in {list(shape)}")
    return TensorSpec(shape, dtype), (begin, end)


# --- grouping ------------------------------------------------------------------------------------------------


def plan_groups(
    specs: Mapping[str, TensorSpec | tuple[Sequence[int], torch.dtype]],
    max_bytes: int | float,
    *,
    split: bool = True,
) -> list[list[Piece]]:
    """Cut a model into groups of pieces, in the mapping's order, each group's record at most ``max_bytes``.

    Sizes are bounded as ``ArrayRecord.count_bytes()`` will count them (:func:`encoded_size`,
    ``RECORD_OVERHEAD``), so ``to_record(group).count_bytes() <= max_bytes`` always holds. Consecutive
    tensors share a group while they fit; ``max_bytes=math.inf`` gives one group (the all-at-once exchange,
    same arithmetic).

    A tensor larger than the budget is split into row ranges of its first dimension (``split=True``). The
    budget is the memory knob: the server's peak is a multiple of the largest group, and the largest
    tensors (a 70B model's 2 GiB embedding and LM head against a 512 MB budget) would otherwise set it
    alone, 4x over. Splitting costs nothing in arithmetic (the mean is elementwise, so a row range averages
    to the same bits as the whole tensor) nor in copies (rows of a contiguous tensor are a view, also of an
    mmapped file), and :class:`Piece` keys (``name[start:stop]``) say where each range goes. A split tensor's
    ranges fill groups of their own. Only a tensor whose single row exceeds the budget (or a 0-d tensor)
    still goes alone over budget; ``split=False`` sends every oversized tensor whole and alone.
    """
    if not max_bytes > 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    groups: list[list[Piece]] = []
    current: list[Piece] = []
    current_bytes = RECORD_OVERHEAD

    def close() -> None:
        nonlocal current, current_bytes
        if current:
            groups.append(current)
        current, current_bytes = [], RECORD_OVERHEAD

    for name, spec in specs.items():
        spec = spec if isinstance(spec, TensorSpec) else TensorSpec(tuple(spec[0]), spec[1])
        size = encoded_size(name, spec)
        if current_bytes + size <= max_bytes:
            current.append(Piece(name))
            current_bytes += size
            continue
        close()
        if RECORD_OVERHEAD + size <= max_bytes or not split or len(spec.shape) == 0 or spec.shape[0] <= 1:
            current, current_bytes = [Piece(name)], RECORD_OVERHEAD + size
            if current_bytes > max_bytes:
                close()
            continue
        for piece in _row_pieces(name, spec, max_bytes):
            groups.append([piece])
    close()
    return groups


def _row_pieces(name: str, spec: TensorSpec, max_bytes: int | float) -> Iterable[Piece]:
    """Equal row ranges of ``spec`` (the last one shorter), each as large as fits in ``max_bytes``."""
    rows = spec.shape[0]
    row_bytes = spec.nbytes // rows
    # The key and header entry grow a little with the range's digits; reserve for the widest range.
    widest = encoded_size(f"{name}[{rows}:{rows}]", TensorSpec((rows, *spec.shape[1:]), spec.dtype))
    overhead = RECORD_OVERHEAD + widest - spec.nbytes
    per_piece = max(1, int((max_bytes - overhead) // row_bytes)) if row_bytes else rows
    for start in range(0, rows, per_piece):
        yield Piece(name, (start, min(start + per_piece, rows)))


def group_specs(group: Sequence[Piece], specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """``{piece key: piece spec}``: what a record for this group must hold."""
    return {piece.key: piece.spec(specs[piece.name]) for piece in group}


def take_group(state: Mapping[str, torch.Tensor], group: Sequence[Piece]) -> dict[str, torch.Tensor]:
    """The group's pieces of an in-memory state, as views."""
    return {piece.key: piece.take(state[piece.name]) for piece in group}
