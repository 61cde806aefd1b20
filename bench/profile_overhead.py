"""What profiling costs: the quickstart with ``profile.enabled`` on against off, alternated in one session.

    python bench/profile_overhead.py [--pairs 3]

Each run is a real ``flwr run`` of ``configs/quickstart.toml`` on one simulation SuperLink (Flower's
default federation: 2 SuperNodes). Runs alternate off/on, on/off, ... so drift in the machine's load hits
both sides alike. Two figures per run:

- ``run_seconds``: the whole ``flwr run`` as a user waits for it (Ray start, imports, all rounds);
- ``round_seconds``: the sum of the rounds' times from ``history.json`` (what profiling can touch).

Prints JSON, writes ``bench/results/profile_overhead.json`` and the section between the markers in
``bench/README.md``. Target: profiling adds at most 3%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the simulation harness the integration tests use

from flower_harness import simulation_superlink  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "profile_overhead.json"
README = ROOT / "bench" / "README.md"
BEGIN, END = "<!-- profile-overhead:begin -->", "<!-- profile-overhead:end -->"
TARGET = 0.03


def run_once(link, output_dir: Path, profiled: bool) -> dict:
    start = time.perf_counter()
    result = link.run_app(
        ROOT, run_config=f"preset='quickstart' output.dir='{output_dir}' profile.enabled={str(profiled).lower()}"
    )
    run_seconds = time.perf_counter() - start
    history = json.loads((output_dir / str(result.run_id) / "history.json").read_text())
    return {
        "profiled": profiled,
        "run_id": result.run_id,
        "run_seconds": run_seconds,
        "round_seconds": sum(r["seconds"] for r in history),
        "profile_written": (output_dir / str(result.run_id) / "profile.jsonl").exists(),
    }


def recording_cost(profile_path: Path, tmp: Path) -> dict:
    """The recorder's own cost, free of machine noise: time writing as many events as a profiled round emits."""
    from flowertune_llm.profiling import Recorder

    events = [json.loads(line) for line in profile_path.read_text().splitlines()]
    rounds = max(e["round"] for e in events if e.get("round") is not None)
    per_round = len(events) / rounds
    recorder = Recorder("server", tmp / "cost.jsonl")
    repeats = 20_000
    start = time.perf_counter()
    for _ in range(repeats):
        with recorder.span("aggregate", from_node=1):
            pass
    seconds_per_event = (time.perf_counter() - start) / repeats
    recorder.close()
    return {"events_per_round": per_round, "seconds_per_event": seconds_per_event,
            "seconds_per_round": per_round * seconds_per_event}  # fmt: skip


def overhead(runs: list[dict], key: str) -> dict:
    on = [r[key] for r in runs if r["profiled"]]
    off = [r[key] for r in runs if not r["profiled"]]
    return {
        "median_on": statistics.median(on),
        "median_off": statistics.median(off),
        "overhead": statistics.median(on) / statistics.median(off) - 1,
    }


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end"


def write_readme(report: dict) -> None:
    run_row, round_row = report["run_seconds"], report["round_seconds"]
    lines = [
        BEGIN,
        f"Measured {report['date']} on {report['machine']}; {report['pairs']} pairs of quickstart runs "
        "(8 rounds, 2 SuperNodes), alternated.",
        "",
        "```",
        f"python bench/profile_overhead.py --pairs {report['pairs']}",
        "```",
        "",
        "| figure | median off s | median on s | overhead |",
        "|---|---|---|---|",
        f"| whole `flwr run` | {run_row['median_off']:.1f} | {run_row['median_on']:.1f} | {run_row['overhead']:+.1%} |",
        f"| sum of rounds | {round_row['median_off']:.2f} | {round_row['median_on']:.2f} | {round_row['overhead']:+.1%} |",
        "",
        f"Target: at most {TARGET:.0%} → **{'met' if report['met'] else 'not met'}** (judged on the whole run).",
        "",
        f"The recorder's own cost, which machine load cannot blur: a profiled round writes "
        f"{report['recording_cost']['events_per_round']:.0f} events at "
        f"{report['recording_cost']['seconds_per_event'] * 1e6:.1f} µs each, "
        f"{report['recording_cost']['seconds_per_round'] * 1e3:.2f} ms per round = "
        f"{report['recording_cost']['share_of_median_round']:.3%} of the median unprofiled round.",
        END,
    ]
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = "\n".join(lines)
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text += f"\n## Profiling overhead\n\nRun `python bench/profile_overhead.py`; see its docstring for the method.\n\n{block}\n"
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    # SIGTERM raises SystemExit, so the harness still stops every Flower process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.environ.setdefault("FLOWERTUNE_LLM_CACHE", str(Path(tempfile.gettempdir()) / "flowertune-llm-bench-cache"))

    order = [profiled for pair in range(args.pairs) for profiled in ((False, True) if pair % 2 == 0 else (True, False))]
    runs = []
    with tempfile.TemporaryDirectory() as scratch, simulation_superlink(Path(scratch)) as link:
        for profiled in order:
            runs.append(run_once(link, Path(scratch) / "runs", profiled))
            print(json.dumps(runs[-1]), file=sys.stderr)
        assert all(r["profile_written"] == r["profiled"] for r in runs)
        profiled_run = next(r for r in runs if r["profiled"])
        cost = recording_cost(Path(scratch) / "runs" / str(profiled_run["run_id"]) / "profile.jsonl", Path(scratch))

    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "pairs": args.pairs,
        "runs": runs,
        "run_seconds": overhead(runs, "run_seconds"),
        "round_seconds": overhead(runs, "round_seconds"),
        "recording_cost": cost,
    }
    cost["share_of_median_round"] = cost["seconds_per_round"] / (
        report["round_seconds"]["median_off"] / 8  # quickstart: 8 rounds
    )
    report["met"] = report["run_seconds"]["overhead"] <= TARGET
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    write_readme(report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
