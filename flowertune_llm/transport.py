"""Model state over Flower messages at each tensor's own width, and the plan that cuts a model into messages.

Encoding (:func:`to_record`) — one :class:`flwr.app.Array` per tensor:

* dtypes NumPy knows (float32, float16, float64, integers, bool) are stored as standard ``.npy`` bytes with
  ``stype="numpy.ndarray"``: exactly what ``Array(ndarray)`` produces, so Flower's own ``Array.numpy()``,
  ``ArrayRecord.to_torch_state_dict()`` and strategies read them, and records made by Flower decode here;
* bfloat16, which NumPy lacks (Flower's ``Array(torch_tensor)`` goes through ``.numpy()`` and raises), is
  stored as its raw little-endian element bytes with ``stype=RAW_STYPE`` and ``dtype="bfloat16"``. The
  custom ``stype`` is the field Flower reserves for "how ``data`` was serialized"; Flower never interprets
  it (it travels verbatim through pickling in the Simulation Engine and through ``deflate``/``inflate`` and
  protobuf in the Deployment Engine), and ``Array.numpy()`` refuses it with a TypeError. That refusal is the
  point: storing bf16 as npy ``uint16`` would make Flower's FedAvg average bit patterns without a word.

Decoding (:func:`from_record`) never goes through float32 and never copies: each tensor is a
``torch.frombuffer`` view of the Array's ``bytes`` (past the npy header where there is one). The view keeps
the bytes alive and must be treated as read-only (``bytes`` are immutable); pass ``copy=True`` for writable
tensors.

Grouping (:func:`plan_groups`) cuts a model into messages of at most ``max_bytes`` as counted by
``ArrayRecord.count_bytes()``, splitting a tensor larger than the budget into row ranges (see there).
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy_format

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
RAW_STYPE = "flowertune.raw"  # C-contiguous little-endian element bytes, no header; dtype names the torch dtype

# Tensor dtypes NumPy has no equivalent for, carried as raw bytes. float8 could join this table the same way.
_RAW_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16}

if sys.byteorder != "little":  # raw bytes are defined as little-endian; every platform torch ships for is
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
    """``torch.bfloat16`` -> ``"bfloat16"``: the name in an Array's ``dtype`` field (NumPy's name where one exists)."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    if name in _RAW_DTYPES:
        return _RAW_DTYPES[name]
    try:
        return _numpy_to_torch(np.dtype(name))
    except TypeError as error:
        raise ValueError(f"unsupported dtype {name!r}") from error


@cache
def _numpy_to_torch(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


@cache
def _torch_to_numpy(dtype: torch.dtype) -> np.dtype | None:
    """The NumPy dtype that carries ``dtype`` as npy, or None where only raw bytes can (bfloat16)."""
    if dtype_name(dtype) in _RAW_DTYPES:
        return None
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        return None


@cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes for a C-ordered array, so our npy bytes equal Flower's own."""
    header = io.BytesIO()
    fields = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        npy_format.write_array_header_1_0(header, fields)
    except ValueError:  # a header over 64 KiB needs format 2.0; np.save picks it the same way
        header = io.BytesIO()
        npy_format.write_array_header_2_0(header, fields)
    return header.getvalue()


# --- encoding ------------------------------------------------------------------------------------------------


def encoded_size(key: str, spec: TensorSpec) -> int:
    """What ``ArrayRecord.count_bytes()`` will count for this entry: data, npy header (if any) and the key."""
    np_dtype = _torch_to_numpy(spec.dtype)
    header = 0 if np_dtype is None else len(_npy_header(np_dtype, spec.shape))
    return spec.nbytes + header + len(key)


def to_array(tensor: torch.Tensor) -> Array:
    """One tensor as an Array at its own width; one copy (into the ``bytes`` Flower requires), no upcast."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    shape = tuple(int(d) for d in tensor.shape)
    # A uint8 view of the elements: works for bf16 (whose .numpy() fails) and for mmap-backed tensors.
    raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    np_dtype = _torch_to_numpy(tensor.dtype)
    if np_dtype is None:
        return Array(dtype=dtype_name(tensor.dtype), shape=shape, stype=RAW_STYPE, data=raw.tobytes())
    data = b"".join((_npy_header(np_dtype, shape), raw))
    return Array(dtype=str(np_dtype), shape=shape, stype=NUMPY_STYPE, data=data)


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``{key: tensor}`` as an ArrayRecord, in the mapping's order, each tensor at its own dtype."""
    record = ArrayRecord()
    for key, tensor in state.items():
        record[key] = to_array(tensor)
    return record


# --- decoding ------------------------------------------------------------------------------------------------


def from_array(array: Array, *, copy: bool = False) -> torch.Tensor:
    """The tensor an Array holds, as a zero-copy view of ``array.data`` unless ``copy``.

    Accepts our raw encoding and any C- or Fortran-ordered npy (what Flower's ``Array(ndarray)`` makes). The
    data length must match the declared shape exactly: a truncated or padded payload is an error, not garbage.
    """
    shape = tuple(array.shape)
    if array.stype == RAW_STYPE:
        if array.dtype not in _RAW_DTYPES:
            raise ValueError(f"raw Array with unsupported dtype {array.dtype!r}")
        dtype, offset, fortran = _RAW_DTYPES[array.dtype], 0, False
    elif array.stype == NUMPY_STYPE:
        np_dtype, npy_shape, fortran, offset = _read_npy_header(array.data)
        if npy_shape != shape or str(np_dtype) != array.dtype:
            raise ValueError(
                f"Array says {array.dtype}{list(shape)} but its npy header says {np_dtype}{list(npy_shape)}"
            )
        if not np_dtype.isnative:
            # Another byte order: rare enough that a converting copy is fine.
            native = np.frombuffer(array.data, dtype=np_dtype, count=math.prod(shape), offset=offset)
            native = native.reshape(shape, order="F" if fortran else "C").astype(np_dtype.newbyteorder("="))
            return torch.from_numpy(native)
        dtype = _numpy_to_torch(np_dtype)
    else:
        raise ValueError(f"unsupported Array stype {array.stype!r}")

    numel = math.prod(shape)
    expected = offset + numel * _itemsize(dtype)
    if len(array.data) != expected:
        raise ValueError(f"Array data is {len(array.data)} bytes, {array.dtype}{list(shape)} needs {expected}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # bytes are read-only; torch warns that it cannot mark a tensor read-only. We document it instead.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(array.data, dtype=dtype, count=numel, offset=offset)
    tensor = flat.view(shape[::-1]).permute(*reversed(range(len(shape)))) if fortran else flat.view(shape)
    return tensor.clone() if copy else tensor


def from_record(record: ArrayRecord, *, copy: bool = False) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` from a record, each at the dtype it was sent in, sharing memory with the record."""
    return {key: from_array(array, copy=copy) for key, array in record.items()}


def _read_npy_header(data: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    stream = io.BytesIO(data)  # shares ``data`` (CPython copies a BytesIO's bytes only on write)
    try:
        version = npy_format.read_magic(stream)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, np_dtype = read(stream)
    except ValueError as error:
        raise ValueError(f"Array data is not valid npy: {error}") from error
    if np_dtype.hasobject:
        raise ValueError("npy Array holds Python objects, which are never unpickled")
    return np_dtype, tuple(shape), bool(fortran), stream.tell()


# --- grouping ------------------------------------------------------------------------------------------------


def plan_groups(
    specs: Mapping[str, TensorSpec | tuple[Sequence[int], torch.dtype]],
    max_bytes: int | float,
    *,
    split: bool = True,
) -> list[list[Piece]]:
    """Cut a model into groups of pieces, in the mapping's order, each group's record at most ``max_bytes``.

    Sizes are counted as ``ArrayRecord.count_bytes()`` counts them (:func:`encoded_size`), so
    ``to_record(group).count_bytes() <= max_bytes`` holds exactly. Consecutive tensors share a group while
    they fit; ``max_bytes=math.inf`` gives one group (the all-at-once exchange, same arithmetic).

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
    current_bytes = 0

    def close() -> None:
        nonlocal current, current_bytes
        if current:
            groups.append(current)
        current, current_bytes = [], 0

    for name, spec in specs.items():
        spec = spec if isinstance(spec, TensorSpec) else TensorSpec(tuple(spec[0]), spec[1])
        size = encoded_size(name, spec)
        if current_bytes + size <= max_bytes:
            current.append(Piece(name))
            current_bytes += size
            continue
        close()
        if size <= max_bytes or not split or len(spec.shape) == 0 or spec.shape[0] <= 1:
            current, current_bytes = [Piece(name)], size
            if size > max_bytes:
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
    # The key and npy header grow a little with the range's digits; reserve for the widest range.
    overhead = encoded_size(f"{name}[{rows}:{rows}]", TensorSpec((rows, *spec.shape[1:]), spec.dtype)) - spec.nbytes
    per_piece = max(1, int((max_bytes - overhead) // row_bytes)) if row_bytes else rows
    for start in range(0, rows, per_piece):
        yield Piece(name, (start, min(start + per_piece, rows)))


def group_specs(group: Sequence[Piece], specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """``{piece key: piece spec}``: what a record for this group must hold."""
    return {piece.key: piece.spec(specs[piece.name]) for piece in group}


def take_group(state: Mapping[str, torch.Tensor], group: Sequence[Piece]) -> dict[str, torch.Tensor]:
    """The group's pieces of an in-memory state, as views."""
    return {piece.key: piece.take(state[piece.name]) for piece in group}
