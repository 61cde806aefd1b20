"""A safetensors checkpoint on local disk (one file, or shards with an index), served through mmap.

:class:`LocalCheckpoint` serves tensors and row ranges through ``safetensors.safe_open``, whose tensors are
views of the memory-mapped file: a node streams a model larger than its RAM and pays one copy per tensor,
into the outgoing message; the server reads the previous round's global model the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from flowertune_llm.weights.tensors import Piece, TensorSpec, entry_spec, read_file_header


def _checkpoint_files(path: Path) -> tuple[list[Path], set[str] | None]:
    """The checkpoint's safetensors files, and the tensor names its index lists (None without an index)."""
    if path.is_file():
        return [path], None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{path} holds several safetensors indexes: {[p.name for p in indexes]}")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))], set(weight_map)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors checkpoint in {path}")
    return files, None


class LocalCheckpoint:
    """A safetensors checkpoint on local disk (one file, or shards with an index), served through mmap.

    :attr:`specs` lists every tensor in the order its bytes lie on disk (file by file, by offset), so planning
    groups over it reads the files front to back. Tensors returned are views of the mapped files, valid while
    the checkpoint is open; nothing is read into memory until touched (a copy into a message, for instance).
    """

    def __init__(self, path: Path | str):
        self.path = Path(path).expanduser()
        # An index defines the checkpoint: tensors its shards hold but it omits are not part of it.
        self.files, listed = _checkpoint_files(self.path)
        located: list[tuple[int, int, str, TensorSpec]] = []
        self._file_of: dict[str, int] = {}
        for number, file in enumerate(self.files):
            header, _ = read_file_header(file)
            for name, entry in header.items():
                if listed is not None and name not in listed:
                    continue
                if name in self._file_of:
                    raise ValueError(f"{name} appears in both {self.files[self._file_of[name]].name} and {file.name}")
                try:
                    spec, (begin, _) = entry_spec(name, entry)
                except ValueError as error:
                    raise ValueError(f"{file.name}: {error}") from None
                self._file_of[name] = number
                located.append((number, begin, name, spec))
        self.specs: dict[str, TensorSpec] = {name: spec for _, _, name, spec in sorted(located)}
        self._handles: list | None = None

    def __enter__(self) -> LocalCheckpoint:
        self._handles = [safe_open(str(file), framework="pt") for file in self.files]
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles = None

    def _handle(self, name: str):
        if self._handles is None:
            raise RuntimeError("open the checkpoint first: `with LocalCheckpoint(path) as checkpoint:`")
        if name not in self._file_of:
            raise KeyError(f"{name}: no such tensor in {self.path}")
        return self._handles[self._file_of[name]]

    def tensor(self, key: str | Piece) -> torch.Tensor:
        """A whole tensor or a row range (``name[start:stop]``), as a view of the mapped file."""
        piece = key if isinstance(key, Piece) else Piece.parse(key)
        handle = self._handle(piece.name)
        if piece.rows is None:
            return handle.get_tensor(piece.name)
        start, stop = piece.rows
        rows = self.specs[piece.name].shape[0] if self.specs[piece.name].shape else 0
        if not 0 <= start < stop <= rows:
            raise ValueError(f"{piece.key}: rows out of range for {self.specs[piece.name].describe()}")
        return handle.get_slice(piece.name)[start:stop]

    def group(self, group: Sequence[Piece | str]) -> dict[str, torch.Tensor]:
        return {(p.key if isinstance(p, Piece) else p): self.tensor(p) for p in group}
