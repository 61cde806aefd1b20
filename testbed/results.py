"""Benchmark results: ``bench/results/<benchmark>/<variant>.json``, each with one metadata header.

Every results file starts with ``"meta"``: the commit the app was at (``+dirty`` when the package had
uncommitted changes), the UTC date, the machine (CPU, cores, GPU), the load average before and after,
the package versions and the exact command. A benchmark measures side by side in one run and stores
ratios; the header says how busy the machine was, because other tenants blur absolute seconds.

``bench/README.md`` quotes figures between ``<!-- name:begin -->`` and ``<!-- name:end -->`` markers that
the benchmark rewrites (:func:`rewrite_readme_block`), each block naming the file it was made from.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from flowertune_llm.atomic import write_atomic, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
PACKAGES = ("flwr", "torch", "transformers", "peft", "trl", "datasets", "safetensors")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def commit() -> str:
    """The app's commit, ``+dirty`` if the package, configs or pyproject differ from it."""
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", "flowertune_llm", "configs", "pyproject.toml")
    return f"{head}+dirty" if dirty else head


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)  # fmt: skip
    torch = sys.modules.get("torch")
    gpu = torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version()}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def meta(benchmark: str, variant: str, load_before: list[float], command: str | None = None) -> dict[str, Any]:
    """The header of a results file written now."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "benchmark": benchmark,
        "variant": variant,
        "commit": commit(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "load": {"before": load_before, "after": load()},
        "versions": versions,
        "command": command or shlex.join(["python", "-m", f"bench.{benchmark}", *sys.argv[1:]]),
    }


def path(benchmark: str, variant: str, suffix: str = ".json") -> Path:
    return RESULTS / benchmark / f"{variant}{suffix}"


def write(benchmark: str, variant: str, payload: dict[str, Any], load_before: list[float],
          command: str | None = None) -> Path:  # fmt: skip
    """Write ``{"meta": ..., **payload}`` atomically to ``bench/results/<benchmark>/<variant>.json``."""
    target = path(benchmark, variant)
    write_json(target, {"meta": meta(benchmark, variant, load_before, command), **payload})
    return target


def read(benchmark: str, variant: str) -> dict[str, Any]:
    return json.loads(path(benchmark, variant).read_text())


def rewrite_readme_block(name: str, block: str, readme: Path = README) -> None:
    """Replace what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in bench/README.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{readme} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    write_atomic(readme, f"{head}{begin}\n{block.strip()}\n{end}{tail}".encode())
