"""The vocabulary of weights: a tensor's spec, a piece of a tensor, dtype names and safetensors headers.

Everything that moves or stores weights speaks in these terms: the message codec (transport.py), the
group planner (groups.py), checkpoints on disk (shards.py) and a node's state (node_state.py). A
safetensors file, or a message payload in that format, is eight bytes of little-endian header length,
a JSON header (``{name: {"dtype", "shape", "data_offsets"}}``), then the tensors' bytes; this module
reads and writes header entries, and both files and payloads go through it, so both get the same checks.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
TORCH_DTYPES = {tag: dtype for dtype, tag in SAFETENSORS_DTYPES.items()}

if sys.byteorder != "little":  # safetensors is little-endian; every platform torch ships for is
    raise ImportError("flowertune_llm.weights assumes a little-endian host")


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
    """A manifest that fits in a ConfigRecord string, so a node can be checked before any tensor moves."""
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
    """``torch.bfloat16`` -> ``"bfloat16"``: how manifests and configs name a dtype."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; the inverse of :func:`dtype_name`."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unsupported dtype {name!r}")
    return dtype


@cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# --- safetensors headers -------------------------------------------------------------------------------------


def header_entry(key: str, spec: TensorSpec, begin: int) -> dict[str, object]:
    """``key``'s entry in a safetensors header, its bytes at ``[begin, begin + spec.nbytes)`` of the data."""
    if spec.dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{key}: safetensors cannot store {spec.dtype}")
    return {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [begin, begin + spec.nbytes]}


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


def read_file_header(path: Path | str) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensor entries (without ``__metadata__``) and where its data starts; errors name it."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        try:
            return read_header(prefix + handle.read(length))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def entry_spec(key: str, entry: object) -> tuple[TensorSpec, tuple[int, int]]:
    """What a safetensors header entry says: the tensor's shape and dtype, and its data offsets."""
    try:
        dtype = TORCH_DTYPES[entry["dtype"]]  # type: ignore[index]
        shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
        begin, end = (int(o) for o in entry["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{key}: malformed safetensors entry {entry!r}") from error
    if any(d < 0 for d in shape):
        raise ValueError(f"{key}: negative dimension in {list(shape)}")
    return TensorSpec(shape, dtype), (begin, end)
