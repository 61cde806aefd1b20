"""Recording where a round's seconds, bytes and megabytes go (``profile.enabled = true``).

Every measurement is an event, one JSON object per line of ``profile.jsonl`` in the run directory:

    {"kind": "span", "node": "server" | <node id>, "round": 3, "name": "aggregate", "parent": "round",
     "start": <unix s>, "seconds": 0.012, ...attributes}
    {"kind": "memory", "node": ..., "round": 3, "time": <unix s>, "rss_mb": 812.4, "peak_rss_mb": 901.2,
     "gpu_allocated_mb": ..., "gpu_reserved_mb": ...}
    {"kind": "message", "node": <node id>, "round": 3, "direction": "down" | "up", "bytes": 272696}
    {"kind": "arrival", "node": <node id>, "round": 3, "order": 1, "seconds": 4.2}   # since the round's send

Clients record inside a Flower mod around the handler (federated/profile_mod.py) and send their events back in the
reply, so nothing in Flower is patched and both engines report alike. When profiling is off the recorder
is :data:`OFF`, whose spans do nothing. Memory figures are MiB (``*_mb``).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from flowertune_llm.units import MiB

PROFILE_FILE = "profile.jsonl"
SUMMARY_FILE = "profile_summary.json"


def memory_snapshot() -> dict[str, float | None]:
    """This process's resident memory now and at its peak, and torch's peak GPU memory (None without a GPU)."""
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    snapshot: dict[str, float | None] = {"rss_mb": psutil.Process().memory_info().rss / MiB, "peak_rss_mb": peak / MiB,
                                         "gpu_allocated_mb": None, "gpu_reserved_mb": None}  # fmt: skip
    if (torch := _torch_on_a_gpu()) is not None:
        snapshot["gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / MiB
        snapshot["gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / MiB
    return snapshot


def reset_gpu_peak() -> None:
    """Start a new GPU peak (per round, not the process's lifetime), when torch uses a GPU."""
    if (torch := _torch_on_a_gpu()) is not None:
        torch.cuda.reset_peak_memory_stats()


def _torch_on_a_gpu():
    """torch, if this process imported it and it has put something on a GPU; never imports torch to find out."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


class Recorder:
    """Collects events for one node; spans nest, and each knows its parent's name."""

    enabled = True

    def __init__(self, node: int | str, sink: Path | None = None):
        self.node = node
        self.round: int | None = None
        self.events: list[dict[str, Any]] = []
        self._stack: list[str] = []
        self._sink = sink.open("a", buffering=1) if sink else None  # line-buffered: a killed run keeps its lines

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("node", self.node)
        event.setdefault("round", self.round)
        self.events.append(event)
        if self._sink:
            self._sink.write(json.dumps(event) + "\n")

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[dict[str, Any]]:
        """Time a block; the yielded dict takes attributes found inside it (steps, cache hit, bytes...)."""
        event = {"kind": "span", "name": name, "parent": self._stack[-1] if self._stack else None, **attributes}
        self._stack.append(name)
        start_wall, start = time.time(), time.perf_counter()
        try:
            yield event
        finally:
            event["seconds"] = time.perf_counter() - start
            event["start"] = start_wall
            self._stack.pop()
            self.emit(event)

    def record_span(self, name: str, seconds: float, start: float, **attributes: Any) -> None:
        """A span measured elsewhere (e.g. waiting summed over many polls), under the current parent."""
        parent = self._stack[-1] if self._stack else None
        self.emit({"kind": "span", "name": name, "parent": parent, "start": start, "seconds": seconds, **attributes})

    def memory(self, process: str = "") -> None:
        """This process's memory (``process`` says which: the server, a ClientApp, a node's worker)."""
        self.emit({"kind": "memory", "time": time.time(), **({"process": process} if process else {}), **memory_snapshot()})

    def close(self) -> None:
        if self._sink:
            self._sink.close()
            self._sink = None


class _Off:
    """The recorder when profiling is off: every call is a no-op, so the hot path pays nothing."""

    enabled = False
    round = None
    events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        pass

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[dict[str, Any]]:
        yield {}

    def record_span(self, name: str, seconds: float, start: float, **attributes: Any) -> None:
        pass

    def memory(self, process: str = "") -> None:
        pass

    def close(self) -> None:
        pass


OFF = _Off()
Profiler = Recorder | _Off  # what code that records takes: a real recorder or OFF
