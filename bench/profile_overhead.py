"""What profiling costs: the quickstart with ``profile.enabled`` on against off, alternated in one session.

    python -m bench.profile_overhead [--pairs 3]

Each run is a real ``flwr run`` of ``configs/quickstart.toml`` on one simulation SuperLink (Flower's
default federation: 2 SuperNodes). Runs alternate off/on, on/off, ... so drift in the machine's load hits
both sides alike. Two figures per run:

- ``run_seconds``: the whole ``flwr run`` as a user waits for it (Ray start, imports, all rounds);
- ``round_seconds``: the sum of the rounds' times from ``history.json`` (what profiling can touch).

Prints JSON, writes ``bench/results/profile_overhead/quickstart-<N>pairs.json`` (:mod:`testbed.results`) and
the block between the ``profile-overhead`` markers in ``bench/README.md``. Target: profiling adds at most 3%.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import block_header
from testbed import results
from testbed.flower import simulation_superlink

BENCHMARK = "profile_overhead"
README_BLOCK = "profile-overhead"
ROOT = results.ROOT
TARGET = 0.03
QUICKSTART_ROUNDS = 8


def run_once(link, output_dir: Path, profiled: bool) -> dict:
    start = time.perf_counter()
    result = link.run_app(
        ROOT, run_config=f"preset='quickstart' output.dir='{output_dir}' profile.enabled={str(profiled).lower()}"
    )
    run_seconds = time.perf_counter() - start
    run_dir = output_dir / str(result.run_id)
    history = json.loads((run_dir / "history.json").read_text())
    row = {
        "profiled": profiled,
        "run_id": result.run_id,
        "run_seconds": run_seconds,
        "round_seconds": sum(r["seconds"] for r in history),
        "profile_written": (run_dir / "profile.jsonl").exists(),
    }
    if profiled:  # what the profile measured: each process's peak resident memory over the run
        rounds = json.loads((run_dir / "profile_summary.json").read_text())["rounds"]
        row["server_peak_rss_mib"] = max(r["server_peak_rss_mb"] for r in rounds)
        row["client_peak_rss_mib"] = max(r["client_peak_rss_mb"] for r in rounds)
    return row


def recording_cost(profile_path: Path, tmp: Path) -> dict:
    """The recorder's own cost, free of machine noise: time writing as many events as a profiled round emits."""
    from flowertune_llm.observe.profiling import Recorder

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


def readme_block(report: dict, results_file: str) -> str:
    meta, cost = report["meta"], report["recording_cost"]
    run_row, round_row = report["run_seconds"], report["round_seconds"]
    measured_on = (
        f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores, load average {meta['load']['after'][0]:.2f} "
        f"at the end; {report['pairs']} pairs of quickstart runs ({QUICKSTART_ROUNDS} rounds, 2 SuperNodes), alternated"
    )
    return "\n".join([
        *block_header(meta, measured_on, results_file),
        "| figure | median off s | median on s | overhead |",
        "|---|---|---|---|",
        f"| whole `flwr run` | {run_row['median_off']:.1f} | {run_row['median_on']:.1f} | {run_row['overhead']:+.1%} |",
        f"| sum of rounds | {round_row['median_off']:.2f} | {round_row['median_on']:.2f} "
        f"| {round_row['overhead']:+.1%} |",
        "",
        f"Target: at most {TARGET:.0%} → **{'met' if report['met'] else 'not met'}** (judged on the whole run).",
        "",
        f"The recorder's own cost, which machine load cannot blur: a profiled round writes "
        f"{cost['events_per_round']:.0f} events at {cost['seconds_per_event'] * 1e6:.1f} µs each, "
        f"{cost['seconds_per_round'] * 1e3:.2f} ms per round = "
        f"{cost['share_of_median_round']:.3%} of the median unprofiled round.",
        "",
        f"Peak resident memory of the profiled runs: ServerApp {report['peak_rss_mib']['server']:.0f} MiB, each "
        f"ClientApp (a Ray actor with the model loaded) {report['peak_rss_mib']['client']:.0f} MiB.",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    # SIGTERM raises SystemExit, so the harness still stops every Flower process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.environ.setdefault("FLOWERTUNE_LLM_CACHE", str(Path(tempfile.gettempdir()) / "flowertune-llm-bench-cache"))

    load_before = results.load()
    order = [profiled for pair in range(args.pairs) for profiled in ((False, True) if pair % 2 == 0 else (True, False))]
    runs = []
    with tempfile.TemporaryDirectory() as scratch, simulation_superlink(Path(scratch)) as link:
        for profiled in order:
            runs.append(run_once(link, Path(scratch) / "runs", profiled))
            print(json.dumps(runs[-1]), file=sys.stderr)
        assert all(r["profile_written"] == r["profiled"] for r in runs)
        profiled_run = next(r for r in runs if r["profiled"])
        cost = recording_cost(Path(scratch) / "runs" / str(profiled_run["run_id"]) / "profile.jsonl", Path(scratch))

    payload = {
        "pairs": args.pairs,
        "runs": runs,
        "run_seconds": overhead(runs, "run_seconds"),
        "round_seconds": overhead(runs, "round_seconds"),
        "recording_cost": cost,
        "peak_rss_mib": {side: max(r[f"{side}_peak_rss_mib"] for r in runs if r["profiled"]) for side in ("server", "client")},
    }
    cost["share_of_median_round"] = cost["seconds_per_round"] / (
        payload["round_seconds"]["median_off"] / QUICKSTART_ROUNDS
    )
    payload["met"] = payload["run_seconds"]["overhead"] <= TARGET
    path = results.write(BENCHMARK, f"quickstart-{args.pairs}pairs", payload, load_before)
    report = json.loads(path.read_text())
    results.rewrite_readme_block(README_BLOCK, readme_block(report, str(path.relative_to(results.README.parent))))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
