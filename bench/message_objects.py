"""What one Flower message costs in the Deployment Engine by how many Arrays it holds, for the same bytes.

Why ``weights.transport.to_record`` packs a message's tensors into one Array: Flower moves a message as objects
(the record, every Array, every 5 MiB chunk of an Array), one RPC per object at each hop (ServerApp ->
SuperLink -> SuperNode -> ClientApp and back). A throwaway Flower app (written to a temporary directory, NumPy
only) runs on :class:`~flowertune_llm.deploy.federation.LocalFederation` (SuperLink + ``--nodes`` SuperNodes on
127.0.0.1, TLS and SuperNode authentication): its ServerApp sends every node ``--bytes`` of float32 split into
``--arrays`` Arrays and the ClientApp answers with the same shape of record; the server times the push and the
whole round trip.
The counts alternate, round after round, so both see the same machine.

Usage (from the repository root)::

    python -m bench.message_objects [--arrays 1 84] [--repeats 6] [--bytes 1300000] [--nodes 2]

84 Arrays is builtin:small-llama's LoRA adapter (6 layers x 7 modules x A, B; 1.3 million bytes). Prints JSON
and writes ``bench/results/message_objects/arrays-<A...>-<N>nodes.json`` through :mod:`testbed.results`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from testbed import results

BENCHMARK = "message_objects"

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "message-objects"
version = "1.0.0"
description = "Round trips of one message shape, for python -m bench.message_objects"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "message_objects_app:server"
clientapp = "message_objects_app:client"

[tool.flwr.app.config]
arrays = "1"
total-bytes = 1
nodes = 1
out = ""
"""

APP = '''\
import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


def record(arrays, total):
    each = max(1, total // arrays // 4)
    return ArrayRecord({f"t{i}": Array(np.random.rand(each).astype(np.float32)) for i in range(arrays)})


# This throwaway app's own records: "weights" (the Arrays) and "shape" (how many, how large).
@client.train()
def train(msg: Message, context: Context) -> Message:
    shape = msg.content["shape"]
    return Message(RecordDict({"weights": record(int(shape["arrays"]), int(shape["total"]))}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    nodes = []
    while len(nodes) < int(config["nodes"]):
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    rows = []
    for arrays in map(int, str(config["arrays"]).split()):
        total = int(config["total-bytes"])
        shape = ConfigRecord({"arrays": arrays, "total": total})
        content = RecordDict({"weights": record(arrays, total), "shape": shape})
        messages = [Message(content, dst_node_id=node, message_type="train") for node in nodes]
        start = time.perf_counter()
        pending = set(grid.push_messages(messages))
        pushed = time.perf_counter()
        errors = []
        while pending:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    errors.append(reply.error.reason)
            time.sleep(0.01)
        done = time.perf_counter()
        rows.append({"arrays": arrays, "push_s": round(pushed - start, 3), "round_trip_s": round(done - start, 3),
                     "errors": errors})
        print(json.dumps(rows[-1]), flush=True)
    with open(config["out"], "w") as f:
        json.dump(rows, f)
'''


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arrays", type=int, nargs="+", default=[1, 84])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--bytes", type=int, default=1_300_000)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()

    from flowertune_llm.deploy.federation import LocalFederation

    plan = " ".join(str(a) for _ in range(args.repeats) for a in args.arrays)
    with tempfile.TemporaryDirectory(prefix="bench-message-objects-") as tmp:
        app = Path(tmp) / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(PYPROJECT)
        (app / "message_objects_app.py").write_text(textwrap.dedent(APP))
        out = Path(tmp) / "rows.json"
        run_config = f"arrays='{plan}' total-bytes={args.bytes} nodes={args.nodes} out='{out}'"
        load_before = results.load()
        with LocalFederation(Path(tmp) / "federation", args.nodes, tls=True, auth=True) as federation:
            done = federation.flwr("run", str(app), federation.connection, "--stream", "--run-config", run_config,
                                   check=False, timeout=1800)  # fmt: skip
        if not out.is_file():
            sys.exit(f"the app wrote no rows:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        rows = json.loads(out.read_text())

    summary = {}
    for arrays in args.arrays:
        mine = [r for r in rows if r["arrays"] == arrays]
        summary[str(arrays)] = {
            "round_trip_s_median": round(statistics.median(r["round_trip_s"] for r in mine), 3),
            "round_trip_s_range": [min(r["round_trip_s"] for r in mine), max(r["round_trip_s"] for r in mine)],
            "push_s_median": round(statistics.median(r["push_s"] for r in mine), 3),
            "errors": sum(len(r["errors"]) for r in mine),
        }
    payload = {
        "config": {"nodes": args.nodes, "bytes": args.bytes, "tls": True, "supernode_auth": True},
        "summary": summary,
        "rows": rows,
    }
    variant = f"arrays-{'-'.join(map(str, args.arrays))}-{args.nodes}nodes"
    print(results.write(BENCHMARK, variant, payload, load_before).read_text())


if __name__ == "__main__":
    main()
