"""The rows each benchmark reads: from the Hugging Face Hub, or from a local copy in the same columns.

``--data-dir DIR`` reads ``DIR/<source>.{jsonl,json,parquet,csv}`` instead of the Hub, so evaluation runs
offline. A local file holds what the leaderboard loads *before* its selection, in the dataset's own
columns (benchmarks.py lists them): FPB's whole ``sentences_50agree`` split, FiQA's train, validation and
test concatenated in that order, ``cais/mmlu``'s test split (all subjects, with ``subject``), and so on.
Every file is checked (present, readable, its columns) before any model loads.

Several leaderboard datasets are loading scripts, which ``datasets`` 4 no longer runs. Their Hub parquet
exports (branch ``refs/convert/parquet``, made by running the same script, so the rows and their order are
the script's) are read instead: FPB, PubMedQA and MedQA. MMLU comes from ``cais/mmlu`` (see benchmarks.py).
The row counts after selection are checked against the leaderboard's (:attr:`Benchmark.rows`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from flowertune_llm.evaluate.benchmarks import Benchmark, Row, Source

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class SourceError(ValueError):
    """A benchmark's data cannot be read; the message names the file or dataset."""


def local_file(source: Source, data_dir: Path) -> Path:
    found = [data_dir / f"{source.name}{suffix}" for suffix in SUFFIXES if (data_dir / f"{source.name}{suffix}").is_file()]
    if not found:
        raise SourceError(f"--data-dir {data_dir}: no {source.name}.jsonl (or {', '.join(SUFFIXES[1:])})")
    if len(found) > 1:
        raise SourceError(f"--data-dir {data_dir}: {source.name} is there twice: {', '.join(p.name for p in found)}")
    return found[0]


def read_local(source: Source, path: Path) -> list[Row]:
    """A local copy's rows, checked for the columns the benchmark reads."""
    try:
        if path.suffix == ".jsonl":
            rows = []
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise SourceError(f"{path}: line {number} is not JSON ({error.msg})") from None
        elif path.suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            from datasets import load_dataset

            loader = "parquet" if path.suffix == ".parquet" else "csv"
            rows = load_dataset(loader, data_files=str(path), split="train").to_list()
    except SourceError:
        raise
    except Exception as error:  # noqa: BLE001 - any unreadable file is named, whatever the reader raised
        raise SourceError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SourceError(f"{path}: expected one object per row")
    if not rows:
        raise SourceError(f"{path}: no rows")
    missing = [c for c in source.columns if c not in rows[0]]
    if missing:
        raise SourceError(f"{path}: lacks column(s) {', '.join(missing)} (has: {', '.join(rows[0])}); "
                          f"{source.name} needs {', '.join(source.columns)}")  # fmt: skip
    return rows


def read_hub(source: Source) -> list[Row]:
    """A Hub dataset's splits, concatenated in order (through ``datasets``, so the local cache serves repeats)."""
    from datasets import load_dataset

    hub = source.hub
    try:
        rows: list[Row] = []
        for split in hub.splits:
            rows += load_dataset(hub.path, hub.name, data_dir=hub.data_dir, revision=hub.revision, split=split).to_list()
    except Exception as error:  # noqa: BLE001 - the Hub or the cache failed: name the dataset and the way out
        where = f"{hub.path}" + (f" ({hub.name})" if hub.name else "") + (f"@{hub.revision}" if hub.revision else "")
        raise SourceError(f"{source.name}: cannot load {where} from the Hub ({type(error).__name__}: {error}); "
                          f"use --data-dir with a local {source.name}.jsonl") from None  # fmt: skip
    return rows


def load_rows(sources: Sequence[Source], data_dir: Path | None) -> dict[str, list[Row]]:
    """Every source's rows, read once even when several benchmarks share it (MMLU's categories)."""
    rows = {}
    for source in dict.fromkeys(sources):
        rows[source.name] = read_local(source, local_file(source, data_dir)) if data_dir else read_hub(source)
    return rows


def check_count(benchmark: Benchmark, count: int, limited: bool) -> str | None:
    """A warning when the full data does not give the leaderboard's row count (a different revision or copy)."""
    if limited or count == benchmark.rows:
        return None
    return f"{benchmark.name}: {count} rows, the leaderboard's selection has {benchmark.rows}: scores are not comparable"
