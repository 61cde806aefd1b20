"""Layer-wise rounds on Flower's Deployment Engine: seconds per group message against ``aggregation.window``.

Every group of a layer-wise round is a message, and in the Deployment Engine each message costs the node a
SuperNode poll (a SuperNode that finds no message sleeps 3 s before it asks again), a new ClientApp process
and the reply's way back, whatever its size. ``aggregation.window`` keeps that many group messages in flight
per node so that the next one is waiting when a node answers. This runs the same aggregation-only rounds (a
small bf16 Llama per node, the tests' ``small_llama``, cut into many groups by a tiny ``max-message-mb``) on
:class:`~flowertune_llm.federation.LocalFederation` (SuperLink + 2 SuperNodes on 127.0.0.1, TLS and SuperNode
authentication), once per window, one federation per run.

Round 1 moves every group up (the nodes hold the model); round 2 moves the round-1 mean down, then every
group up. Exchanges per round: the train message plus G - 1 groups up, and in round 2 also G - 1 down.

Usage (from the repository root)::

    python bench/layerwise_deployment.py [--windows 1 2 4] [--max-message-mb 0.04]

Prints JSON and writes ``bench/results/layerwise_deployment.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_PATH = BENCH_DIR / "results" / "layerwise_deployment.json"
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the harness and the small model the tests use


def run(window: int, max_message_mb: float, workdir: Path) -> dict:
    import torch
    from flower_harness import SuperLinkHandle
    from test_layerwise_simulation import aggregation_only_run, small_llama

    from flowertune_llm.federation import LocalFederation

    models = [small_llama(workdir / f"model-{node}", torch.bfloat16, seed=node) for node in range(2)]
    node_configs = [{"model-path": str(m), "state-dir": str(workdir / "node-state")} for m in models]
    federation = LocalFederation(workdir / "federation", num_supernodes=2, tls=True, auth=True, node_configs=node_configs)
    with federation:
        link = SuperLinkHandle(
            federation.cli_env, federation.connection, federation.address, federation.superlink_log,
            federation.superlink_dir, federation.superlink.pid, federation.tracker,
        )  # fmt: skip
        config = aggregation_only_run(
            models[0], "layerwise", workdir / "runs", f"aggregation.window={window}"
        ).replace("aggregation.max-message-mb=0.1", f"aggregation.max-message-mb={max_message_mb}")
        started = time.perf_counter()
        result = link.run_app(REPO_ROOT, run_config=config, timeout=1800)
        wall = time.perf_counter() - started
    if not result.ok:
        sys.exit(f"window {window}: the run failed: {result.details}")
    history = json.loads((workdir / "runs" / str(result.run_id) / "history.json").read_text())
    rounds = []
    for record in history:
        groups = record["groups"]
        exchanges = groups + (groups - 1 if record["bytes_down"] else 0)  # train + groups up (+ groups down)
        rounds.append({
            "round": record["round"], "groups": groups, "exchanges": exchanges,
            "seconds": round(record["seconds"], 2), "seconds_per_exchange": round(record["seconds"] / exchanges, 2),
            "aggregated": len(record["aggregated"]),
        })  # fmt: skip
    return {"window": window, "run_seconds": round(wall, 1), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-message-mb", type=float, default=0.04)
    args = parser.parse_args()
    results = {
        "benchmark": "layerwise_deployment",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": {"cores": os.cpu_count()},
        "config": {"nodes": 2, "tls": True, "supernode_auth": True, "max_message_mb": args.max_message_mb},
        "load_average_before": os.getloadavg(),
        "runs": [],
    }
    for window in args.windows:
        print(f"window {window} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-layerwise-deployment-") as tmp:
            results["runs"].append(run(window, args.max_message_mb, Path(tmp)))
        print(json.dumps(results["runs"][-1]), file=sys.stderr, flush=True)
    results["load_average_after"] = os.getloadavg()
    base = {r["round"]: r["seconds"] for r in results["runs"][0]["rounds"]}
    results["round_seconds_over_first_window"] = {
        str(run["window"]): {str(r["round"]): round(r["seconds"] / base[r["round"]], 3) for r in run["rounds"]}
        for run in results["runs"]
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
