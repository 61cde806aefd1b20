"""Reading a run's ``profile.jsonl``: per-round and per-node summaries, tables, and a timeline plot.

``flowertune-llm profile RUN_ID`` (see cli.py) is the user's way in; the ServerApp also prints the same
tables at the end of a profiled run, so ``flwr log`` shows them.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowertune_llm.atomic import write_json
from flowertune_llm.observe.profiling import PROFILE_FILE, SUMMARY_FILE
from flowertune_llm.units import MiB

Event = dict[str, Any]
SERVER = "server"
# Direct children of the server's "round" span; together they should account for all of it. Federated
# evaluation is one part ("evaluate"); its own sends and waits are inside it, not counted again.
SERVER_PARTS = ("configure", "send", "wait", "decode", "aggregate", "write", "history", "checkpoint", "evaluate")


class ProfileNotFound(LookupError):
    pass


@dataclass
class Profile:
    events: list[Event]
    warnings: list[str] = field(default_factory=list)


def load_profile(path: Path) -> Profile:
    """Every complete event in ``path``; a truncated or corrupt line becomes a warning, never an exception."""
    events, warnings = [], []
    with path.open(errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
                if not isinstance(event, dict) or "kind" not in event:
                    raise ValueError("not an event")
            except ValueError:
                warnings.append(f"{path}:{number}: skipped an unreadable line (truncated or corrupt)")
                continue
            events.append(event)
    return Profile(events, warnings)


def find_run(run: str, output_dirs: Iterable[Path]) -> Path:
    """The run directory for a run id (searched under ``output_dirs``) or a run directory path."""
    as_path = Path(run).expanduser()
    candidates = [as_path] if as_path.is_dir() else []
    searched = [d.expanduser().resolve() for d in output_dirs]
    candidates += [d / run for d in searched]
    for candidate in candidates:
        if (candidate / PROFILE_FILE).is_file():
            return candidate
        if candidate.is_dir():
            raise ProfileNotFound(f"run {run} at {candidate} was not profiled: run it with profile.enabled=true")
    raise ProfileNotFound(f"no run {run!r}: looked for {run}/{PROFILE_FILE} under {', '.join(map(str, searched))}")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _max(values: list[float]) -> float | None:
    return max(values) if values else None


def summarize(events: list[Event]) -> dict[str, Any]:
    """Per-round and per-node figures from the events of one run."""
    by_round: dict[int, list[Event]] = defaultdict(list)
    for event in events:
        if event.get("round") is not None:
            by_round[int(event["round"])].append(event)

    rounds = []
    for server_round in sorted(by_round):
        rounds.append(_summarize_round(server_round, by_round[server_round]))
    return {"rounds": rounds, "nodes": _summarize_nodes(events)}


def _spans(events: list[Event], name: str, server: bool) -> list[Event]:
    return [e for e in events if e["kind"] == "span" and e["name"] == name and (e["node"] == SERVER) == server]


def _round_parts(events: list[Event], name: str) -> float:
    return sum((e["seconds"] for e in _spans(events, name, server=True) if e.get("parent") == "round"), 0.0)


def _summarize_round(server_round: int, events: list[Event]) -> dict[str, Any]:
    wall = sum(e["seconds"] for e in _spans(events, "round", server=True))
    parts = {name: _round_parts(events, name) for name in SERVER_PARTS}
    arrivals = [e["seconds"] for e in events if e["kind"] == "arrival"]
    train = [e["seconds"] for e in _spans(events, "train", server=False)]
    evaluated = [e["seconds"] for e in _spans(events, "eval", server=False)]
    memory = [e for e in events if e["kind"] == "memory"]
    server_memory = [e["peak_rss_mb"] for e in memory if e["node"] == SERVER]
    client_memory = [e["peak_rss_mb"] for e in memory if e["node"] != SERVER]
    gpu = [e["gpu_reserved_mb"] for e in memory if e.get("gpu_reserved_mb") is not None]
    return {
        "round": server_round,
        "wall_seconds": wall,
        **{f"{name}_seconds": seconds for name, seconds in parts.items()},
        # Share of the round the named parts explain; the rest is bookkeeping between them.
        "coverage": sum(parts.values()) / wall if wall else None,
        "train_seconds_median": _median(train),
        "train_seconds_max": _max(train),
        "eval_seconds_max": _max(evaluated),
        "straggler_wait_seconds": (max(arrivals) - min(arrivals)) if arrivals else None,
        "bytes_down": sum(e["bytes"] for e in events if e["kind"] == "message" and e["direction"] == "down"),
        "bytes_up": sum(e["bytes"] for e in events if e["kind"] == "message" and e["direction"] == "up"),
        "server_peak_rss_mb": _max(server_memory),
        "client_peak_rss_mb": _max(client_memory),
        "gpu_peak_reserved_mb": _max(gpu),
    }


def _summarize_nodes(events: list[Event]) -> list[dict[str, Any]]:
    by_node: dict[Any, list[Event]] = defaultdict(list)
    for event in events:
        if event["node"] != SERVER:
            by_node[event["node"]].append(event)
    nodes = []
    for node, node_events in sorted(by_node.items(), key=lambda item: str(item[0])):
        spans = defaultdict(list)
        for e in node_events:
            if e["kind"] == "span":
                spans[e["name"]].append(e)
        train = spans["train"]
        rates = [e["tokens_per_second"] for e in train if e.get("tokens_per_second")]
        padded_rates = [e["padded_tokens_per_second"] for e in train if e.get("padded_tokens_per_second")]
        memory = [e for e in node_events if e["kind"] == "memory"]
        nodes.append(
            {
                "node": node,
                "rounds": len({e["round"] for e in node_events if e["kind"] == "arrival"}),
                "handler_seconds_median": _median([e["seconds"] for e in spans["handler"]]),
                "train_seconds_median": _median([e["seconds"] for e in train]),
                "tokens_per_second_median": _median(rates),  # padding left out
                "padded_tokens_per_second_median": _median(padded_rates),
                "model_loads": sum(1 for e in spans["model_load"] if not e.get("cache_hit")),
                "model_load_seconds": sum(e["seconds"] for e in spans["model_load"]),
                "data_load_seconds": sum(e["seconds"] for e in spans["data_load"]),
                "arrival_seconds_median": _median([e["seconds"] for e in node_events if e["kind"] == "arrival"]),
                "bytes_down": sum(e["bytes"] for e in node_events if e["kind"] == "message" and e["direction"] == "down"),
                "bytes_up": sum(e["bytes"] for e in node_events if e["kind"] == "message" and e["direction"] == "up"),
                "peak_rss_mb": _max([e["peak_rss_mb"] for e in memory]),
                "peak_rss_mb_by_process": {
                    process: _max([e["peak_rss_mb"] for e in memory if e.get("process", "clientapp") == process])
                    for process in sorted({e.get("process", "clientapp") for e in memory})
                },  # a deployment node: the short-lived ClientApp and the worker that trains
                "gpu_peak_reserved_mb": _max([e["gpu_reserved_mb"] for e in memory if e.get("gpu_reserved_mb") is not None]),
                "gpu_peak_allocated_mb": _max([e["gpu_allocated_mb"] for e in memory if e.get("gpu_allocated_mb") is not None]),
            }
        )
    return nodes


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "MiB":
        return f"{value / MiB:.2f}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_tables(summary: dict[str, Any]) -> str:
    rounds = _table(
        ["round", "wall s", "train med s", "train max s", "straggler s", "wait s", "aggregate s", "checkpoint s",
         "down MiB", "up MiB", "server peak MiB", "client peak MiB"],
        [
            [_cell(r["round"]), _cell(r["wall_seconds"]), _cell(r["train_seconds_median"]), _cell(r["train_seconds_max"]),
             _cell(r["straggler_wait_seconds"]), _cell(r["wait_seconds"]), _cell(r["aggregate_seconds"]),
             _cell(r["checkpoint_seconds"]), _cell(r["bytes_down"], "MiB"), _cell(r["bytes_up"], "MiB"),
             _cell(r["server_peak_rss_mb"]), _cell(r["client_peak_rss_mb"])]
            for r in summary["rounds"]
        ],
    )  # fmt: skip
    nodes = _table(
        ["node", "rounds", "handler med s", "train med s", "tokens/s", "with padding", "model loads", "model load s", "data load s",
         "down MiB", "up MiB", "peak RSS MiB", "GPU peak MiB"],
        [
            [_cell(n["node"]), _cell(n["rounds"]), _cell(n["handler_seconds_median"]), _cell(n["train_seconds_median"]),
             _cell(n["tokens_per_second_median"]), _cell(n["padded_tokens_per_second_median"]), _cell(n["model_loads"]),
             _cell(n["model_load_seconds"]),
             _cell(n["data_load_seconds"]), _cell(n["bytes_down"], "MiB"), _cell(n["bytes_up"], "MiB"),
             _cell(n["peak_rss_mb"]), _cell(n["gpu_peak_reserved_mb"])]
            for n in summary["nodes"]
        ],
    )  # fmt: skip
    return f"Per round\n{rounds}\n\nPer node\n{nodes}"


_COLORS = {
    "configure": "tab:purple", "send": "tab:pink", "wait": "lightgray", "decode": "tab:olive",
    "aggregate": "tab:red", "write": "teal", "history": "tab:brown", "checkpoint": "black", "model_load": "tab:orange",
    "adapter_in": "deepskyblue", "data_load": "tab:green", "train": "tab:blue", "adapter_out": "navy",
    "evaluate": "gold", "eval": "goldenrod",
}  # fmt: skip (every part its own colour: adapter_in and adapter_out apart)


def plot(events: list[Event], path: Path) -> Path:
    """A timeline (one lane per node, the server on top) and the memory of every process over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    spans = [e for e in events if e["kind"] == "span" and e["name"] in _COLORS]
    memory = [e for e in events if e["kind"] == "memory"]
    origin = min((e["start"] for e in spans), default=0.0)
    lanes = [SERVER] + sorted({e["node"] for e in spans if e["node"] != SERVER}, key=str)
    fig, (timeline, mem) = plt.subplots(2, 1, figsize=(11, 2.2 + 0.45 * len(lanes) + 3), dpi=110, sharex=True,
                                         gridspec_kw={"height_ratios": [len(lanes) + 1, 3]})  # fmt: skip
    timeline.tick_params(axis="x", labelbottom=True)  # shared x: the top panel keeps its numbers too
    for lane, node in enumerate(lanes):
        bars = [(e["start"] - origin, e["seconds"], _COLORS[e["name"]]) for e in spans if e["node"] == node]
        timeline.broken_barh([(s, d) for s, d, _ in bars], (lane - 0.4, 0.8), facecolors=[c for *_, c in bars])
    rounds = [e for e in spans if e["name"] == "configure"]
    for e in rounds:
        timeline.axvline(e["start"] - origin, color="gray", lw=0.5, ls=":")
        timeline.text(e["start"] - origin, -0.75, f"r{e['round']}", fontsize=7, color="gray")
    timeline.set_yticks(range(len(lanes)), [str(n) for n in lanes])
    timeline.invert_yaxis()
    timeline.set_xlabel("seconds since the first round started")
    timeline.legend(handles=[Patch(color=c, label=n) for n, c in _COLORS.items()], ncol=6, fontsize=7,
                    loc="upper center", bbox_to_anchor=(0.5, -0.25))  # fmt: skip
    for node in lanes:
        for process in sorted({e.get("process", "") for e in memory if e["node"] == node}):
            mine = [e for e in memory if e["node"] == node and e.get("process", "") == process]
            name = f"{node} {process}".strip()
            points = sorted((e["time"] - origin, e["peak_rss_mb"]) for e in mine)
            line = mem.plot(*zip(*points), "o-", ms=3, label=f"{name} peak RSS")[0]
            gpu = sorted((e["time"] - origin, e["gpu_reserved_mb"]) for e in mine if e.get("gpu_reserved_mb") is not None)
            if gpu:
                mem.plot(*zip(*gpu), "s--", ms=3, color=line.get_color(), label=f"{name} GPU peak reserved")
    mem.set_ylabel("MiB")
    mem.set_xlabel("seconds since the first round started")
    mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_summary(run_dir: Path, events: list[Event]) -> dict[str, Any]:
    summary = summarize(events)
    write_json(run_dir / SUMMARY_FILE, summary)
    return summary
