"""Throughput of layer-wise FedAvg: the torch streaming mean against the NumPy one, and a whole layer-wise round.

``kernel``: the same in-memory client tensors folded by ``streaming.GroupMean`` (torch, fp32 accumulation)
and by a plain NumPy weighted mean (``bench/numpy_mean.py``), per dtype; NumPy cannot do bfloat16.
GB/s = bytes of client tensors folded per second (1 GB = 1e9 bytes), result included.

``round``: a layer-wise round over synthetic checkpoints on disk (``bench/synthetic_llama.py``, one per
client): every group of every client is read from its mmapped safetensors, encoded into an ArrayRecord, sent
through Flower's wire form (deflate, then inflate from the bytes; ``--wire none`` skips it), decoded (views),
folded, and each finished group is written to a sharded output checkpoint. Peak anonymous memory (RssAnon,
sampled every 50 ms; mmapped file pages are page cache, not counted) shows what the budget bounds.

Usage (from the repository root)::

    python bench/streaming_mean.py kernel [--mb 512] [--clients 3]
    python bench/streaming_mean.py round --clients-dir /tmp/bench/llama70b-k1-s{0,1,2} --out /tmp/bench/avg \\
        [--max-message-mb 512] [--wire deflate|none]

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from pathlib import Path

import numpy_mean
import torch

from flowertune_llm.shards import LocalCheckpoint, ShardedCheckpointWriter
from flowertune_llm.streaming import GroupMean
from flowertune_llm.transport import (
    from_record,
    group_specs,
    plan_groups,
    specs_of,
    to_record,
)


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return math.nan


class PeakMemory:
    """Samples RssAnon in a thread: the process's own allocations, without page-cache-backed mmaps."""

    def __init__(self) -> None:
        self.peak = _rss_anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_anon_mb())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def kernel(mb: int, clients: int, repeats: int) -> dict:
    """Fold ``clients`` states of ``mb`` MB each (a 70B MLP row block and a smaller tensor) and divide."""
    results = {}
    weights = [float(w) for w in range(3, 3 + clients)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        itemsize = torch.empty(0, dtype=dtype).element_size()
        numel = mb * 10**6 // itemsize
        cols = 8192
        shapes = {"big": (numel // cols - 64, cols), "small": (64, cols)}
        states = [
            {k: torch.empty(s, dtype=torch.float32).uniform_(-0.03, 0.03).to(dtype) for k, s in shapes.items()}
            for _ in range(clients)
        ]
        nbytes = sum(t.nbytes for state in states for t in state.values())
        entry = {"client_bytes": nbytes}

        def run_torch(states: list = states) -> None:
            mean = GroupMean(specs_of(states[0]))
            for state, weight in zip(states, weights, strict=True):
                assert mean.add(state, weight) is None
            mean.result()

        entry["torch_streaming"] = _best(run_torch, repeats, nbytes)
        if dtype != torch.bfloat16:
            np_states = [{k: v.numpy() for k, v in state.items()} for state in states]

            def run_numpy(np_states: list = np_states) -> None:
                numpy_mean.weighted_mean(np_states, weights)

            entry["numpy_weighted_mean"] = _best(run_numpy, repeats, nbytes)
        results[str(dtype).removeprefix("torch.")] = entry
    return {
        "benchmark": "kernel",
        "clients": clients,
        "mb_per_client": mb,
        "threads": torch.get_num_threads(),
        **results,
    }


def _best(fn, repeats: int, nbytes: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "seconds": round(best, 3),
        "GB_per_s": round(nbytes / best / 1e9, 3),
        "all_seconds": [round(t, 3) for t in times],
    }


def _through_wire(record):
    from flwr.app import Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    message = Message(RecordDict({"arrays": record}), dst_node_id=1, message_type="train")
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    return inflate_object_from_contents(message.object_id, contents).content["arrays"]


def layerwise_round(client_dirs: list[Path], out: Path, max_message_mb: float, wire: str) -> dict:
    checkpoints = [LocalCheckpoint(d).__enter__() for d in client_dirs]
    specs = checkpoints[0].specs
    groups = plan_groups(specs, max_message_mb * 1e6)
    weights = [float(100 + 10 * k) for k in range(len(checkpoints))]
    timings = {"read+encode": 0.0, "wire": 0.0, "decode": 0.0, "fold": 0.0, "finish": 0.0, "write": 0.0}
    model_bytes = sum(s.nbytes for s in specs.values())
    largest_record = 0
    start = time.perf_counter()
    with PeakMemory() as memory:
        with ShardedCheckpointWriter(out, specs) as writer:
            for group in groups:
                mean = GroupMean(group_specs(group, specs))
                for checkpoint, weight in zip(checkpoints, weights, strict=True):
                    t = time.perf_counter()
                    record = to_record(checkpoint.group(group))
                    largest_record = max(largest_record, record.count_bytes())
                    timings["read+encode"] += time.perf_counter() - t
                    if wire == "deflate":
                        t = time.perf_counter()
                        record = _through_wire(record)
                        timings["wire"] += time.perf_counter() - t
                    t = time.perf_counter()
                    update = from_record(record)
                    timings["decode"] += time.perf_counter() - t
                    t = time.perf_counter()
                    problem = mean.add(update, weight)
                    timings["fold"] += time.perf_counter() - t
                    assert problem is None, problem
                    del record, update
                t = time.perf_counter()
                result = mean.result()
                timings["finish"] += time.perf_counter() - t
                t = time.perf_counter()
                for key, tensor in result.items():
                    writer.write(key, tensor)
                timings["write"] += time.perf_counter() - t
                del mean, result
            t = time.perf_counter()
        timings["commit (fsync, rename)"] = time.perf_counter() - t
    seconds = time.perf_counter() - start
    return {
        "benchmark": "round",
        "clients": [str(d) for d in client_dirs],
        "model_bytes": model_bytes,
        "groups": len(groups),
        "max_message_mb": max_message_mb,
        "largest_record_bytes": largest_record,
        "wire": wire,
        "seconds": round(seconds, 2),
        "client_GB_per_s": round(model_bytes * len(client_dirs) / seconds / 1e9, 3),
        "peak_rss_anon_mb": round(memory.peak),
        "seconds_by_stage": {k: round(v, 2) for k, v in timings.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernel")
    k.add_argument("--mb", type=int, default=512, help="MB per client state")
    k.add_argument("--clients", type=int, default=3)
    k.add_argument("--repeats", type=int, default=3)
    r = sub.add_parser("round")
    r.add_argument("--clients-dir", type=Path, nargs="+", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--max-message-mb", type=float, default=512)
    r.add_argument("--wire", choices=["deflate", "none"], default="deflate")
    args = parser.parse_args()
    if args.command == "kernel":
        result = kernel(args.mb, args.clients, args.repeats)
    else:
        result = layerwise_round(args.clients_dir, args.out, args.max_message_mb, args.wire)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
