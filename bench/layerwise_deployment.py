"""Layer-wise rounds on Flower's Deployment Engine: seconds per group message against ``aggregation.window``.

Every group of a layer-wise round is a message, and in the Deployment Engine each message costs the node a
SuperNode poll (a SuperNode that finds no message sleeps 3 s before it asks again), a new ClientApp process
and the reply's way back, whatever its size. ``aggregation.window`` keeps that many group messages in flight
per node so that the next one is waiting when a node answers. This runs the same aggregation-only rounds (a
small bf16 Llama per node, the tests' ``small_llama``, cut into many groups by a tiny ``max-message-mb``) on
:class:`~flowertune_llm.deploy.federation.LocalFederation` (SuperLink + 2 SuperNodes on 127.0.0.1, TLS and
SuperNode authentication), once per window, one federation per run.

Round 1 moves every group up (the nodes hold the model); round 2 moves the round-1 mean down, then every
group up. Exchanges per round: the train message plus G - 1 groups up, and in round 2 also G - 1 down.

Usage (from the repository root)::

    python -m bench.layerwise_deployment [--windows 1 2 4] [--max-message-mb 0.04]

Prints JSON and writes ``bench/results/layerwise_deployment/windows-<W...>-<MiB>mib.json`` through
:mod:`testbed.results`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from testbed import results

BENCHMARK = "layerwise_deployment"
NODES = 2
def run(window: int, max_message_mb: float, workdir: Path) -> dict:
    from flowertune_llm.deploy.federation import LocalFederation
    from testbed.flower import timed_federation_run
    from testbed.models import aggregation_only_run, small_llama

    models = [small_llama(workdir / f"model-{node}", seed=node) for node in range(NODES)]
    node_configs = [{"model-path": str(m), "state-dir": str(workdir / "node-state")} for m in models]
    # Two aggregation-only rounds of the whole model, as the tests' layer-wise runs.
    config = aggregation_only_run(models[0], "layerwise", workdir / "runs", f"aggregation.window={window}", max_message_mb)
    federation = LocalFederation(workdir / "federation", NODES, tls=True, auth=True, node_configs=node_configs)
    result, wall = timed_federation_run(federation, results.ROOT, config, timeout=1800)
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
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-message-mb", type=float, default=0.04, help="MiB per group message")
    args = parser.parse_args()
    load_before = results.load()
    payload = {
        "config": {"nodes": NODES, "tls": True, "supernode_auth": True, "max_message_mb": args.max_message_mb},
        "runs": [],
    }
    for window in args.windows:
        print(f"window {window} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-layerwise-deployment-") as tmp:
            payload["runs"].append(run(window, args.max_message_mb, Path(tmp)))
        print(json.dumps(payload["runs"][-1]), file=sys.stderr, flush=True)
    base = {r["round"]: r["seconds"] for r in payload["runs"][0]["rounds"]}
    payload["round_seconds_over_first_window"] = {
        str(run["window"]): {str(r["round"]): round(r["seconds"] / base[r["round"]], 3) for r in run["rounds"]}
        for run in payload["runs"]
    }
    variant = f"windows-{'-'.join(map(str, args.windows))}-{args.max_message_mb:g}mib"
    print(results.write(BENCHMARK, variant, payload, load_before).read_text())


if __name__ == "__main__":
    main()
