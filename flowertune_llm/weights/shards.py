"""Sharded safetensors on disk: written piece by piece and committed atomically, read back through mmap.

:class:`ShardedCheckpointWriter` writes a checkpoint in Hugging Face's layout
(``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``, or a single ``model.safetensors``)
without ever holding it in memory. Every tensor's shape and dtype are known before the round (they are the
global model's), so each shard's safetensors header, and with it every tensor's byte offset, is fixed up
front; each finished group, or row range of a tensor, is then written straight to its place with
``pwrite`` and can be freed. Shards are cut by size like ``huggingface_hub`` does (its own splitter plans
them), independently of the message groups, so layer-wise and all-at-once rounds write byte-identical files.

Never half-written: everything goes to ``.<name>.partial-XXXX`` beside the target, is fsynced, checked for
complete coverage, and renamed into place only then; an exception removes the partial directory, and one
left by a killed process is removed by the next writer for the same target.

They are read back by :class:`~flowertune_llm.weights.local_checkpoint.LocalCheckpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from flowertune_llm.weights.disk import check_disk_space
from flowertune_llm.weights.tensors import Piece, TensorSpec, header_entry, specs_of

ONE_FILE = 1 << 62  # a shard size no checkpoint reaches: everything in one file
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # 5 GB: huggingface_hub's and transformers' historical default
INDEX_NAME = "model.safetensors.index.json"
FILENAME_PATTERN = "model{suffix}.safetensors"
_PWRITE_MAX = 1 << 30  # Linux writes at most ~2 GiB per call; stay well below


# --- layout --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardLayout:
    filename: str
    header: bytes  # 8-byte little-endian length, then the JSON header padded with spaces to 8 bytes
    offsets: dict[str, int]  # tensor name -> absolute byte offset of its data in the file
    size: int  # the file's final size


def _shard_header(names: Sequence[str], specs: Mapping[str, TensorSpec], metadata: Mapping[str, str]) -> ShardLayout:
    # Widest dtypes first, as safetensors orders them, so every tensor's offset is a multiple of its item size
    # (mmapped tensors stay aligned); model order within a width.
    order = sorted(names, key=lambda n: -specs[n].itemsize)
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    position = 0
    relative: dict[str, int] = {}
    for name in order:
        relative[name] = position
        entries[name] = header_entry(name, specs[name], position)
        position += specs[name].nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    header = struct.pack("<Q", len(body)) + body
    return ShardLayout(
        filename="",
        header=header,
        offsets={n: len(header) + r for n, r in relative.items()},
        size=len(header) + position,
    )


@dataclass(frozen=True)
class CheckpointLayout:
    """Where every tensor of a checkpoint goes: shard files, headers, offsets, sizes. Pure; nothing is written."""

    specs: dict[str, TensorSpec]
    shards: list[ShardLayout]
    shard_of: dict[str, int]  # tensor name -> index into shards

    @classmethod
    def plan(
        cls,
        specs: Mapping[str, TensorSpec],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
        filename_pattern: str = FILENAME_PATTERN,
    ) -> CheckpointLayout:
        metadata = {"format": "pt"} if metadata is None else metadata
        split = split_state_dict_into_shards_factory(
            dict(specs), get_storage_size=lambda spec: spec.nbytes,
            filename_pattern=filename_pattern, max_shard_size=max_shard_bytes,
        )  # fmt: skip
        shards, shard_of = [], {}
        for filename, names in split.filename_to_tensors.items():
            layout = _shard_header(names, specs, metadata)
            shards.append(ShardLayout(filename, layout.header, layout.offsets, layout.size))
            shard_of.update({name: len(shards) - 1 for name in names})
        return cls(dict(specs), shards, shard_of)

    @property
    def tensor_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())

    def index_json(self) -> bytes | None:
        """HF's ``model.safetensors.index.json``, or None for a single-file checkpoint (HF writes none then)."""
        if len(self.shards) == 1:
            return None
        weight_map = {name: self.shards[self.shard_of[name]].filename for name in self.specs}
        return (
            json.dumps({"metadata": {"total_size": self.tensor_bytes}, "weight_map": weight_map}, indent=2) + "\n"
        ).encode()

    @property
    def total_bytes(self) -> int:
        """Bytes the checkpoint occupies on disk (shards and index), for :func:`check_disk_space`."""
        index = self.index_json()
        return sum(shard.size for shard in self.shards) + (len(index) if index else 0)


# --- writing -------------------------------------------------------------------------------------------------


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    position = 0
    while position < len(data):
        written = os.pwrite(fd, data[position : position + _PWRITE_MAX], offset + position)
        if written <= 0:
            raise OSError(f"pwrite wrote {written} bytes")
        position += written


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rows(spec: TensorSpec) -> int:
    return spec.shape[0] if spec.shape else 1


class ShardedCheckpointWriter:
    """Write a sharded safetensors checkpoint to ``target`` piece by piece; commit on a clean exit.

    ::

        with ShardedCheckpointWriter(out_dir, specs) as writer:   # checks disk space, creates the partial dir
            for group in groups:
                for key, tensor in finished(group).items():
                    writer.write(key, tensor)                       # straight to its offset; free it after
            writer.add_file("config.json", config_path)
        # here out_dir is complete, or untouched if the block raised

    ``write`` takes a tensor name or a :class:`~flowertune_llm.weights.tensors.Piece` key (``name[start:stop]`` for
    a row range) and refuses a tensor whose shape or dtype is not the piece's. Rewriting a piece is allowed
    (it overwrites the same bytes). :meth:`commit` refuses a checkpoint with any byte not written.
    One writer per target at a time: opening one removes partial directories a killed writer left.
    """

    def __init__(
        self,
        target: Path | str,
        specs: Mapping[str, TensorSpec],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
        filename_pattern: str = FILENAME_PATTERN,
    ):
        self.target = Path(target).expanduser().absolute()
        self.layout = CheckpointLayout.plan(specs, max_shard_bytes, metadata, filename_pattern)
        self._scratch: Path | None = None
        self._fds: list[int] = []
        self._written: dict[str, list[tuple[int, int]]] = {}
        self._extra: dict[str, bytes | Path] = {}

    # context management
    def __enter__(self) -> ShardedCheckpointWriter:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def open(self) -> None:
        parent = self.target.parent
        for stale in parent.glob(f".{self.target.name}.partial-*") if parent.exists() else ():
            shutil.rmtree(stale, ignore_errors=True)
        check_disk_space(parent, self.layout.total_bytes, what=f"checkpoint {self.target.name}")
        parent.mkdir(parents=True, exist_ok=True)
        self._scratch = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=parent))
        try:
            for shard in self.layout.shards:
                fd = os.open(self._scratch / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                self._fds.append(fd)
                _pwrite_all(fd, memoryview(shard.header), 0)
                os.ftruncate(fd, shard.size)  # final length now (sparse); pieces fill it in any order
        except BaseException:
            self.abort()
            raise

    def write(self, key: str | Piece, tensor: torch.Tensor) -> None:
        if self._scratch is None:
            raise RuntimeError("writer is not open")
        piece = key if isinstance(key, Piece) else Piece.parse(key)
        whole = self.layout.specs.get(piece.name)
        if whole is None:
            raise ValueError(f"{piece.key}: no such tensor in this checkpoint")
        expected = piece.spec(whole)
        if TensorSpec.of(tensor) != expected:
            raise ValueError(f"{piece.key} is {TensorSpec.of(tensor).describe()}, expected {expected.describe()}")
        index = self.layout.shard_of[piece.name]
        start, stop = piece.rows or (0, _rows(whole))
        row_bytes = whole.nbytes // _rows(whole) if whole.nbytes else 0
        _pwrite_all(
            self._fds[index], _tensor_bytes(tensor), self.layout.shards[index].offsets[piece.name] + start * row_bytes
        )
        self._written.setdefault(piece.name, []).append((start, stop))

    def inner_path(self, name: str) -> Path:
        """A path inside the checkpoint being written (for a directory of its own, e.g. a server optimizer's
        state): whatever is there when :meth:`commit` renames the checkpoint into place is committed with it."""
        if self._scratch is None:
            raise RuntimeError("writer is not open")
        if "/" in name or name in {s.filename for s in self.layout.shards} | {INDEX_NAME} | set(self._extra):
            raise ValueError(f"cannot use the name {name!r} inside the checkpoint")
        return self._scratch / name

    def add_file(self, name: str, content: bytes | str | Path) -> None:
        """Put a small extra file (``config.json``, an adapter config) in the checkpoint, committed with it."""
        if "/" in name or name in {s.filename for s in self.layout.shards} | {INDEX_NAME}:
            raise ValueError(f"cannot add a file named {name!r}")
        self._extra[name] = content.encode() if isinstance(content, str) else content

    def missing(self) -> list[str]:
        """Tensors (or row ranges of them) not written yet."""
        gaps = []
        for name, spec in self.layout.specs.items():
            covered = 0
            for start, stop in sorted(self._written.get(name, [])):
                if start > covered:
                    break
                covered = max(covered, stop)
            if covered < _rows(spec):
                gaps.append(name if covered == 0 else f"{name}[{covered}:{_rows(spec)}]")
        return gaps

    def commit(self) -> Path:
        if self._scratch is None:
            raise RuntimeError("writer is not open")
        try:
            gaps = self.missing()
            if gaps:
                raise ValueError(f"checkpoint incomplete: {len(gaps)} tensor(s) not written, e.g. {gaps[0]}")
            for fd in self._fds:
                os.fsync(fd)
            self._close_fds()
            index = self.layout.index_json()
            extra = dict(self._extra) | ({INDEX_NAME: index} if index else {})
            for name, content in extra.items():
                if isinstance(content, Path):
                    shutil.copyfile(content, self._scratch / name)
                else:
                    (self._scratch / name).write_bytes(content)
                with open(self._scratch / name, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.chmod(self._scratch / name, 0o644)
            os.chmod(self._scratch, 0o755)  # mkdtemp makes it owner-only
            _fsync_dir(self._scratch)
            self._swap_into_place()
            self._scratch = None
            _fsync_dir(self.target.parent)
        except BaseException:
            self.abort()
            raise
        return self.target

    def _swap_into_place(self) -> None:
        assert self._scratch is not None
        if not self.target.exists():
            os.replace(self._scratch, self.target)
            return
        # A directory cannot be renamed over a non-empty one: move the old one aside first, and back on failure.
        old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
        os.replace(self.target, old / "checkpoint")
        try:
            os.replace(self._scratch, self.target)
        except BaseException:
            os.replace(old / "checkpoint", self.target)
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def abort(self) -> None:
        """Drop everything written; the target is left as it was."""
        self._close_fds()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def save_local_checkpoint(
    state: Mapping[str, torch.Tensor],
    directory: Path | str,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Mapping[str, bytes | str | Path] | None = None,
) -> Path:
    """Write a model's state once to local disk (atomically, sharded), so it can be served by mmap afterwards.

    Unlike ``safetensors.torch.save_file`` this accepts tensors that share storage (tied embeddings) and writes
    every name given, so the served names are exactly the model's.
    """
    with ShardedCheckpointWriter(directory, specs_of(state), max_shard_bytes=max_shard_bytes) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        for name, content in (extra_files or {}).items():
            writer.add_file(name, content)
    return Path(directory)


class StoreInsideCheckpoint:
    """A store written in a directory of its own inside a checkpoint being written, committed or dropped with
    it: what a round stage keeps beside the new global model (a server optimizer's state, the change sent to
    nodes). A subclass names the directory and makes the writer; the round opens, commits or aborts it."""

    DIRECTORY: str

    def __init__(self) -> None:
        self.writer: ShardedCheckpointWriter | None = None

    def _writer_for(self, directory: Path) -> ShardedCheckpointWriter:
        raise NotImplementedError

    def open_inside(self, checkpoint: ShardedCheckpointWriter) -> None:
        self.writer = self._writer_for(checkpoint.inner_path(self.DIRECTORY))
        self.writer.open()

    def commit(self) -> None:
        assert self.writer is not None
        self.writer.commit()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def _open_writer(self) -> ShardedCheckpointWriter:
        if self.writer is None:
            raise RuntimeError(f"{type(self).__name__}: its store inside the round's checkpoint is not open")
        return self.writer
