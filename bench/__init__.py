"""Benchmarks: each runs from the repository root as ``python -m bench.<name>``; see bench/README.md.

Results go through :mod:`testbed.results`; what two README blocks share is here.
"""

from __future__ import annotations

from typing import Any


def block_header(meta: dict[str, Any], measured_on: str, results_file: str) -> list[str]:
    """The first lines of a README results block: when and on what, the app's commit, the raw file, the command."""
    return [
        f"Measured {meta['date_utc']} UTC on {measured_on}. App at commit {meta['commit']}. Raw: `{results_file}`.",
        "",
        "```",
        meta["command"],
        "```",
        "",
    ]
