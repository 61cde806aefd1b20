"""Throughput of layer-wise FedAvg: the torch streaming mean against the NumPy one, and a whole layer-wise round.

``kernel``: the same in-memory client tensors folded by ``weights.streaming.GroupMean`` (torch, fp32
accumulation) and by a plain NumPy weighted mean (``testbed.reference.weighted_mean``), per dtype; NumPy cannot
do bfloat16. GB/s = bytes of client tensors folded per second (1 GB = 1e9 bytes), result included.

``round``: a layer-wise round over synthetic checkpoints on disk (``python -m testbed.synthetic_llama``, one per
client): every group of every client is read from its mmapped safetensors, encoded into an ArrayRecord, sent
through Flower's wire form (deflate, then inflate from the bytes; ``--wire none`` skips it), decoded (views),
folded, and each finished group is written to a sharded output checkpoint. Peak anonymous memory (RssAnon,
sampled every 20 ms by :class:`testbed.grids.MemorySampler`; mmapped file pages are page cache, not counted)
shows what the budget bounds.

Sizes given in MB (``--mb``, ``--max-message-mb``) are MiB, as ``aggregation.max-message-mb`` is.

Usage (from the repository root)::

    python -m bench.streaming_mean kernel [--mb 512] [--clients 3] [--repeats 3]
    python -m bench.streaming_mean round --clients-dir /tmp/bench/llama70b-k1-s{0,1,2} --out /tmp/bench/avg \\
        [--max-message-mb 512] [--wire deflate|none]

Prints JSON and writes it through :mod:`testbed.results` to ``bench/results/streaming_mean/`` as
``kernel-<C>x<MB>mib.json`` or ``round-<C>clients-<MB>mib-<wire>.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from flowertune_llm.federated import protocol
from flowertune_llm.units import MiB
from flowertune_llm.weights.groups import group_specs, plan_groups
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.shards import ShardedCheckpointWriter
from flowertune_llm.weights.streaming import GroupMean
from flowertune_llm.weights.tensors import specs_of
from flowertune_llm.weights.transport import from_record, to_record
from testbed import results
from testbed.grids import memory_sampler
from testbed.reference import weighted_mean

BENCHMARK = "streaming_mean"


def kernel(mb: int, clients: int, repeats: int) -> dict:
    """Fold ``clients`` states of ``mb`` MiB each (a 70B MLP row block and a smaller tensor) and divide."""
    by_dtype = {}
    weights = [float(w) for w in range(3, 3 + clients)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        itemsize = torch.empty(0, dtype=dtype).element_size()
        numel = mb * MiB // itemsize
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
                weighted_mean(np_states, weights)

            entry["numpy_weighted_mean"] = _best(run_numpy, repeats, nbytes)
        by_dtype[str(dtype).removeprefix("torch.")] = entry
    return {
        "mode": "kernel",
        "clients": clients,
        "mb_per_client": mb,
        "threads": torch.get_num_threads(),
        **by_dtype,
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
    """A group as a node's ``train.send`` reply carries it, deflated into Flower's objects and inflated back."""
    from flwr.app import Message
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    message = Message(protocol.SendRes(record).to_content(), dst_node_id=1, message_type=protocol.SEND)
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    return protocol.SendRes.from_content(inflate_object_from_contents(message.object_id, contents).content).arrays


def layerwise_round(client_dirs: list[Path], out: Path, max_message_mb: float, wire: str) -> dict:
    checkpoints = [LocalCheckpoint(d).__enter__() for d in client_dirs]
    specs = checkpoints[0].specs
    groups = plan_groups(specs, max_message_mb * MiB)
    weights = [float(100 + 10 * k) for k in range(len(checkpoints))]
    timings = {"read+encode": 0.0, "wire": 0.0, "decode": 0.0, "fold": 0.0, "finish": 0.0, "write": 0.0}
    model_bytes = sum(s.nbytes for s in specs.values())
    largest_record = 0
    memory = memory_sampler()
    memory.reset()
    start = time.perf_counter()
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
        "mode": "round",
        "clients": [str(d) for d in client_dirs],
        "model_bytes": model_bytes,
        "groups": len(groups),
        "max_message_mb": max_message_mb,
        "largest_record_bytes": largest_record,
        "wire": wire,
        "seconds": round(seconds, 2),
        "client_GB_per_s": round(model_bytes * len(client_dirs) / seconds / 1e9, 3),
        "peak_rss_anon_mb": round(memory.snapshot()["peak_anon_mb"]),
        "seconds_by_stage": {k: round(v, 2) for k, v in timings.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernel")
    k.add_argument("--mb", type=int, default=512, help="MiB per client state")
    k.add_argument("--clients", type=int, default=3)
    k.add_argument("--repeats", type=int, default=3)
    r = sub.add_parser("round")
    r.add_argument("--clients-dir", type=Path, nargs="+", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--max-message-mb", type=float, default=512, help="MiB per group")
    r.add_argument("--wire", choices=["deflate", "none"], default="deflate")
    args = parser.parse_args()
    load_before = results.load()
    if args.command == "kernel":
        payload = kernel(args.mb, args.clients, args.repeats)
        variant = f"kernel-{args.clients}x{args.mb}mib"
    else:
        payload = layerwise_round(args.clients_dir, args.out, args.max_message_mb, args.wire)
        variant = f"round-{len(args.clients_dir)}clients-{args.max_message_mb:g}mib-{args.wire}"
    print(results.write(BENCHMARK, variant, payload, load_before).read_text())


if __name__ == "__main__":
    main()
