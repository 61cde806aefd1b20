"""The memory experiment: server and client peak memory of layer-wise vs all-at-once FedAvg, against k and N.

Synthetic Llama-3.1-70B-shaped models (testbed/synthetic_llama.py: hidden 8192, intermediate 28672, 64 heads,
8 KV heads, vocab 128256, random bf16) with k decoder layers are averaged in aggregation-only rounds
(``max-steps=0``, full weights) by the app's own round loop (``StreamingStrategy``) and the app's own client
handlers (``federated.client_round.handle``), each client in its own process. The grid between them
(:class:`testbed.grids.ProcessGrid`) passes Flower ``Message`` contents over pipes, so what is measured is the
app, not Flower's transport (the SuperLink's message buffers are not in these figures).

Every configuration runs in a fresh server process (``--one``), so peaks do not carry over. Recorded per
process: ``VmHWM`` (peak resident set, file pages included) and the peak of anonymous memory (``RssAnon``,
sampled every 20 ms: what the process itself allocated; mmapped model pages are reclaimable page cache).

Client models: ``--distinct`` models are built once at the largest k (seeds 0..distinct-1, client i holds
model i mod distinct); smaller k are views (symlinked shards, an index listing a subset of tensors).

The throughput target compares the layer-wise round's bytes per second (client bytes averaged / round
seconds) with a plain in-memory NumPy weighted mean (``testbed.reference.weighted_mean``) of one decoder
layer from N clients, measured in the same run.

Usage (from the repository root)::

    python -m bench.layerwise_memory --work /var/tmp/lw --layers 1 2 4 --clients 2 4 \\
        --compare-vocab 8192 --compare-layers 1
    python -m bench.layerwise_memory --replot    # no runs: merge the sweep rows, recompute, redraw
    python -m bench.layerwise_memory --strategies fedavg fedadam --layers 1 2 --clients 2 --vocab 8192 --rounds 2

``--strategies`` compares server optimizers with FedAvg instead (same runs, same models, each in its own
process): a server optimizer reads the global model and its state through mmap and writes its new state
to disk, so its server peak should stay within 10 % of FedAvg's. Round 2 is where the state is read back.

Prints JSON and writes it through :mod:`testbed.results` to
``bench/results/layerwise_memory/llama70b-k<K...>-n<N...>-<MiB>mib.json`` with the plot beside it (``.png``);
``--replot`` also reads the sweep's rows beside it (``...-sweep.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from testbed import results as bench_results

BENCHMARK = "layerwise_memory"
LLAMA_70B_LAYERS = 80


def _layer_names(specs, layers: int) -> list[str]:
    keep = []
    for name in specs:
        if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= layers:
            continue
        keep.append(name)
    return keep


def model_view(full: Path, layers: int, out: Path) -> Path:
    """``full`` restricted to its first ``layers`` decoder layers, without copying a byte of weights."""
    from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
    from flowertune_llm.weights.shards import INDEX_NAME

    out.mkdir(parents=True, exist_ok=True)
    checkpoint = LocalCheckpoint(full)
    names = _layer_names(checkpoint.specs, layers)
    for file in checkpoint.files:
        link = out / file.name
        if not link.exists():
            link.symlink_to(file)
    index = full / INDEX_NAME
    weight_map = (json.loads(index.read_text())["weight_map"] if index.exists()
                  else dict.fromkeys(checkpoint.specs, checkpoint.files[0].name))  # fmt: skip
    file_of = {name: weight_map[name] for name in names}
    total = sum(checkpoint.specs[n].nbytes for n in names)
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": file_of}))
    config = json.loads((full / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config))
    return out


def build_models(work: Path, layers: int, distinct: int, vocab: int | None) -> list[Path]:
    from testbed import synthetic_llama

    models = []
    for seed in range(distinct):
        out = work / f"models-v{vocab or 'full'}" / f"llama70b-{layers}l-seed{seed}"
        if not (out / "config.json").exists():
            overrides = {"vocab_size": vocab} if vocab else {}
            summary = synthetic_llama.build(out, layers, seed=seed, **overrides)
            print(f"built {out} ({summary['bytes_on_disk'] / 1e9:.1f} GB, {summary['seconds']} s)", file=sys.stderr)
        models.append(out)
    return models


# --- one configuration, in its own process --------------------------------------------------------------------


def run_one(args: argparse.Namespace) -> dict:
    from flowertune_llm.config import default_run_config, parse_run_config
    from flowertune_llm.federated.run_directory import RunDirectory
    from flowertune_llm.federated.strategy import StreamingStrategy
    from flowertune_llm.training import models
    from flowertune_llm.weights.exchange import Exchange
    from testbed.grids import ProcessGrid, memory_sampler

    sampler = memory_sampler()
    base = sampler.snapshot()
    client_models = [Path(p) for p in args.models]
    flat = default_run_config() | {
        "model.name": str(client_models[0]), "model.quantization": 0, "model.device-map": "cpu",
        "train.training-arguments.max-steps": 0, "strategy.fraction-train": 1.0,
        "strategy.min-train-nodes": args.clients, "aggregation.mode": args.mode,
        "strategy.name": args.strategy, "num-server-rounds": args.rounds, "train.save-every-round": args.rounds,
        "aggregation.max-message-mb": args.max_message_mb, "output.dir": str(args.run_root),
        # One group in flight: the grid here keeps replies in the server's process, where Flower's SuperLink
        # (a process of its own) would hold the ones a window asks ahead.
        "aggregation.window": 1,
    }  # fmt: skip
    config = parse_run_config(flat)
    specs, files = models.weight_manifest(config.model.name)
    exchange = Exchange.for_full_model(config, specs, files)
    node_configs = [
        {"model-path": str(client_models[i % len(client_models)]), "state-dir": str(args.run_root / "node-state")}
        for i in range(args.clients)
    ]
    run_dir = RunDirectory.create(config.output.root, f"{args.mode}-n{args.clients}-k{args.layers}", {})
    with ProcessGrid(node_configs, flat) as grid:
        # A server optimizer steps from the model the nodes start from (client 0's), as start.base_model gives it.
        strategy = StreamingStrategy(config, run_dir, exchange, base=client_models[0])
        sampler.reset()
        start = time.perf_counter()
        strategy.run(grid, None)
        seconds = time.perf_counter() - start
        server = sampler.snapshot()
        clients = grid.memory()
    record = strategy.history[0]
    model_bytes = sum(spec.nbytes for spec in specs.values())
    result = {
        "mode": args.mode, "clients": args.clients, "layers": args.layers, "vocab": args.vocab or 128256,
        "strategy": args.strategy, "rounds": args.rounds,
        "round_seconds_each": [round(r.seconds, 2) for r in strategy.history],
        "groups": record.groups, "aggregated": len(record.aggregated), "failures": record.failures,
        "model_gb": model_bytes / 1e9, "round_seconds": round(seconds, 2),
        "client_gb_per_s": round(args.clients * model_bytes / seconds / 1e9, 3),
        "server_base_mb": round(base["anon_mb"]), "server_peak_anon_mb": round(server["peak_anon_mb"]),
        "server_vmhwm_mb": round(server["vmhwm_mb"]),
        "client_peak_anon_mb": max(round(c["peak_anon_mb"]) for c in clients),
        "client_vmhwm_mb": max(round(c["vmhwm_mb"]) for c in clients),
        "bytes_up": record.bytes_up,
    }  # fmt: skip
    shutil.rmtree(run_dir.path)
    return result


def numpy_baseline(model: Path, clients: int, repeats: int = 2) -> dict:
    """A plain NumPy weighted mean of decoder layer 0 from ``clients`` in-memory copies (distinct values)."""
    import numpy as np
    import torch

    from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
    from testbed.reference import weighted_mean

    with LocalCheckpoint(model) as checkpoint:
        names = [n for n in checkpoint.specs if ".layers.0." in n]
        layer = {n: checkpoint.tensor(n).view(torch.int16).numpy().view(np.uint16).copy() for n in names}
    states = [layer] + [{n: (a ^ np.uint16(i)) for n, a in layer.items()} for i in range(1, clients)]
    nbytes = clients * sum(a.nbytes for a in layer.values())
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        weighted_mean(states, [1.0 + i for i in range(clients)], bf16=True)
        best = min(best, time.perf_counter() - start)
    return {"clients": clients, "bytes": nbytes, "seconds": round(best, 3), "gb_per_s": round(nbytes / best / 1e9, 3)}


# --- server optimizers against FedAvg ------------------------------------------------------------------------


def compare_strategies(args: argparse.Namespace) -> dict:
    """Each strategy on the same models, N and k, in a fresh process each; the server peak ratio to FedAvg's."""
    results = {"ram_gb": _ram_gb(), "max_message_mb": args.max_message_mb, "rounds": args.rounds, "runs": []}
    vocab = args.vocab
    for layers in args.layers:
        full_models = build_models(args.work, max(args.layers), args.distinct, vocab)
        views = [model_view(m, layers, args.work / "views" / f"v{vocab or 'full'}-k{layers}" / m.name) for m in full_models]
        for clients in args.clients:
            for strategy in args.strategies:
                command = [sys.executable, "-m", f"bench.{BENCHMARK}", "--one", "--mode", "layerwise",
                           "--clients", str(clients), "--layers", str(layers), "--strategy", strategy,
                           "--rounds", str(args.rounds), "--max-message-mb", str(args.max_message_mb),
                           "--run-root", str(args.work / "runs"), "--models", *map(str, views),
                           *(["--vocab", str(vocab)] if vocab else [])]  # fmt: skip
                print(f"running {strategy} N={clients} k={layers} vocab={vocab or 128256}", file=sys.stderr, flush=True)
                done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=bench_results.ROOT)
                if done.returncode != 0:
                    raise SystemExit(f"{strategy} N={clients} k={layers} failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(row), file=sys.stderr, flush=True)
                results["runs"].append(row)
    ratios = {}
    for row in results["runs"]:
        fedavg = next(r for r in results["runs"] if r["strategy"] == "fedavg" and r["clients"] == row["clients"]
                      and r["layers"] == row["layers"])  # fmt: skip
        if row["strategy"] != "fedavg":
            key = f"{row['strategy']},N={row['clients']},k={row['layers']}"
            ratios[key] = round(row["server_peak_anon_mb"] / fedavg["server_peak_anon_mb"], 3)
    results["targets"] = {"server_peak_over_fedavg": ratios}  # target <= 1.10
    return results


# --- the sweep ---------------------------------------------------------------------------------------------------


def sweep(args: argparse.Namespace) -> dict:
    results = {"ram_gb": _ram_gb(), "max_message_mb": args.max_message_mb, "runs": [], "numpy": []}
    plan = [("layerwise", n, k, None) for n in args.clients for k in args.layers]
    plan += [(mode, n, k, args.compare_vocab) for mode in ("layerwise", "all_at_once")
             for n in args.compare_clients for k in args.compare_layers]  # fmt: skip
    for mode, clients, layers, vocab in plan:
        top = max(args.layers) if vocab is None else max(args.compare_layers)
        full_models = build_models(args.work, top, args.distinct, vocab)
        views = [model_view(m, layers, args.work / "views" / f"v{vocab or 'full'}-k{layers}" / m.name)
                 for m in full_models]  # fmt: skip
        command = [sys.executable, "-m", f"bench.{BENCHMARK}", "--one", "--mode", mode, "--clients", str(clients),
                   "--layers", str(layers), "--max-message-mb", str(args.max_message_mb),
                   "--run-root", str(args.work / "runs"), "--models", *map(str, views),
                   *(["--vocab", str(vocab)] if vocab else [])]  # fmt: skip
        print(f"running {mode} N={clients} k={layers} vocab={vocab or 128256}", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=bench_results.ROOT)
        if done.returncode != 0:
            results["runs"].append({"mode": mode, "clients": clients, "layers": layers, "vocab": vocab or 128256,
                                    "error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]})  # fmt: skip
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(row), file=sys.stderr, flush=True)
        results["runs"].append(row)
    for clients in args.clients:
        results["numpy"].append(numpy_baseline(build_models(args.work, max(args.layers), args.distinct, None)[0], clients))
    _targets(results)
    return results


def replot(variant: str) -> dict:
    """The sweep's rows (``<variant>-sweep.jsonl``, one JSON object per line, appended by earlier runs) merged
    into the variant's results: a row of the results replaces a sweep row of the same mode, N, k and vocab.
    The header of the run replotted is kept as ``measured``."""
    results = bench_results.read(BENCHMARK, variant)
    header = results.pop("meta")
    results.setdefault("measured", header)
    key = lambda r: (r["mode"], r["clients"], r["layers"], r["vocab"])
    sweep = bench_results.path(BENCHMARK, f"{variant}-sweep", ".jsonl")
    sweep_rows = map(json.loads, sweep.read_text().splitlines())
    rows = {key(r): r | {"from_sweep": True} for r in sweep_rows}
    rows |= {key(r): r for r in results["runs"] if "error" not in r}
    results["runs"] = sorted(rows.values(), key=lambda r: (r["vocab"] != 128256, r["mode"], r["clients"], r["layers"]))
    _targets(results)
    return results


def _targets(results: dict) -> None:
    runs = [r for r in results["runs"] if "error" not in r]
    full = [r for r in runs if r["vocab"] == 128256 and r["mode"] == "layerwise"]
    flat = {}
    for clients in sorted({r["clients"] for r in full}):
        peaks = [r["server_peak_anon_mb"] for r in full if r["clients"] == clients]
        flat[str(clients)] = round(max(peaks) / min(peaks) - 1, 3)
    compare = {}
    for r in runs:
        if r["vocab"] != 128256:
            compare.setdefault((r["clients"], r["layers"]), {})[r["mode"]] = r["server_peak_anon_mb"]
    ratios = {f"N={n},k={k}": round(v["layerwise"] / v["all_at_once"], 3)
              for (n, k), v in compare.items() if len(v) == 2}  # fmt: skip
    numpy_rate = {r["clients"]: r["gb_per_s"] for r in results["numpy"]}
    same_run = [r for r in full if not r.get("from_sweep")]  # throughput is compared within one run only
    throughput = {f"N={r['clients']},k={r['layers']}": round(r["client_gb_per_s"] / numpy_rate[r["clients"]], 3)
                  for r in same_run if r["clients"] in numpy_rate}  # fmt: skip
    results["targets"] = {
        "layerwise_server_peak_growth_over_k": flat,  # (max/min - 1) across k, per N: target <= 0.10
        "layerwise_over_all_at_once_server_peak": ratios,  # target <= 0.25
        "layerwise_over_numpy_bytes_per_s": throughput,  # target >= 0.5
    }
    results["extrapolated"] = extrapolate(runs)


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept (slope 0 for a single point)."""
    if len(set(xs)) < 2:
        return 0.0, sum(ys) / len(ys)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def extrapolate(runs: list[dict], layers: int = LLAMA_70B_LAYERS) -> dict:
    """Server peaks at ``layers`` decoder layers: layer-wise by a straight line through the measured k, per N;
    all-at-once as the measured multiple of the model above the base (from the both-modes comparison) times
    the 80-layer model, since it holds every reply and the sum whole and did not fit here at the real vocab."""
    full = [r for r in runs if r["vocab"] == 128256 and r["mode"] == "layerwise"]
    if not full:
        return {}
    gb_slope, gb_base = _line([r["layers"] for r in full], [r["model_gb"] for r in full])
    out: dict = {"layers": layers, "model_gb": round(gb_base + gb_slope * layers, 1), "layerwise_server_peak_mb": {}}
    for clients in sorted({r["clients"] for r in full}):
        rows = [r for r in full if r["clients"] == clients]
        slope, base = _line([r["layers"] for r in rows], [r["server_peak_anon_mb"] for r in rows])
        out["layerwise_server_peak_mb"][f"N={clients}"] = round(base + slope * layers)
    for r in runs:
        if r["mode"] == "all_at_once" and r["vocab"] != 128256:
            copies = (r["server_peak_anon_mb"] - r["server_base_mb"]) / (r["model_gb"] * 1e9 / 2**20)
            out["all_at_once_model_copies_above_base"] = round(copies, 2)
            out["all_at_once_clients"] = r["clients"]
            out[f"all_at_once_server_peak_gb_N={r['clients']}"] = round(copies * out["model_gb"] * 1e9 / 2**30, 1)
    return out


def _ram_gb() -> float:
    import psutil

    return round(psutil.virtual_memory().total / 1e9, 1)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    runs = [r for r in results["runs"] if "error" not in r]
    full = [r for r in runs if r["vocab"] == 128256 and r["mode"] == "layerwise"]
    extra = results.get("extrapolated", {})
    to = extra.get("layers", LLAMA_70B_LAYERS)
    for clients in sorted({r["clients"] for r in full}):
        rows = sorted((r for r in full if r["clients"] == clients), key=lambda r: r["layers"])
        ks = [r["layers"] for r in rows]
        line = axes[0].plot(ks, [r["server_peak_anon_mb"] / 1024 for r in rows], "o-", label=f"server, N={clients}")
        peak_80 = extra.get("layerwise_server_peak_mb", {}).get(f"N={clients}")
        if peak_80:
            axes[0].plot([ks[-1], to], [rows[-1]["server_peak_anon_mb"] / 1024, peak_80 / 1024], ":",
                         color=line[0].get_color())  # fmt: skip
    client_rows = sorted(full, key=lambda r: r["layers"])
    axes[0].plot([r["layers"] for r in client_rows], [r["client_peak_anon_mb"] / 1024 for r in client_rows], "s",
                 color="tab:gray", label="a client, any N")  # fmt: skip
    copies = extra.get("all_at_once_model_copies_above_base")
    if copies and full:
        slope, base = _line([r["layers"] for r in full], [r["model_gb"] for r in full])
        ks = list(range(1, to + 1))
        axes[0].plot(ks, [(copies * (base + slope * k) * 1e9 + full[0]["server_base_mb"] * 2**20) / 2**30 for k in ks],
                     "--", color="tab:red", label=f"all-at-once server, N={extra['all_at_once_clients']}, extrapolated ({copies} models + base)")  # fmt: skip
        axes[0].plot(ks, [(base + slope * k) * 1e9 / 2**30 for k in ks], "-", color="black", lw=0.8,
                     label="one copy of the model (bf16)")  # fmt: skip
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel(f"decoder layers k (Llama-3.1-70B shapes; dotted: extrapolated to {to})")
    axes[0].set_ylabel("peak anonymous memory (GiB)")
    axes[0].set_title("layer-wise: peak memory vs k and N")
    axes[0].legend(fontsize=7)
    compare = [r for r in runs if r["vocab"] != 128256]
    labels = [f"{r['mode']}\nN={r['clients']} k={r['layers']}" for r in compare]
    axes[1].bar(labels, [r["server_peak_anon_mb"] / 1024 for r in compare], color="tab:blue", label="server")
    axes[1].bar(labels, [r["client_peak_anon_mb"] / 1024 for r in compare], color="tab:orange", alpha=0.6,
                label="one client")  # fmt: skip
    axes[1].set_ylabel("peak anonymous memory (GiB)")
    axes[1].set_title(f"both modes, vocab {compare[0]['vocab'] if compare else '-'}")
    axes[1].legend(fontsize=7)
    axes[1].tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/flowertune-layerwise"))
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--distinct", type=int, default=2, help="distinct client models (disk: each is a model)")
    parser.add_argument("--compare-vocab", type=int, default=8192, help="vocab for the both-modes comparison")
    parser.add_argument("--compare-layers", type=int, nargs="+", default=[1])
    parser.add_argument("--compare-clients", type=int, nargs="+", default=[2])
    parser.add_argument("--max-message-mb", type=float, default=256, help="MiB per group message")
    parser.add_argument("--strategies", nargs="+", help="compare these strategy.name values (the first: fedavg)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per run (2 to read a server optimizer's state back)")
    parser.add_argument(
        "--replot", action="store_true",
        help="no runs: merge the results file of these --layers, --clients and --max-message-mb with the sweep rows "
        "beside it (<variant>-sweep.jsonl), recompute targets, redraw",
    )  # fmt: skip
    # one configuration (internal)
    parser.add_argument("--one", action="store_true")
    parser.add_argument("--mode", default="layerwise")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--run-root", type=Path)
    args = parser.parse_args()
    if args.one:
        args.clients, args.layers = args.clients[0], args.layers[0]
        print(json.dumps(run_one(args)))
        return
    variant = (f"llama70b-k{'-'.join(map(str, args.layers))}-n{'-'.join(map(str, args.clients))}"
               f"-{args.max_message_mb:g}mib")  # fmt: skip
    load_before = bench_results.load()
    if args.strategies:
        if args.strategies[0] != "fedavg":
            parser.error("--strategies: list fedavg first, the baseline")
        variant = f"{'-'.join(args.strategies)}-{variant}-v{args.vocab or 'full'}-r{args.rounds}"
        path = bench_results.write(BENCHMARK, variant, compare_strategies(args), load_before)
        print(path.read_text())
        return
    results = replot(variant) if args.replot else sweep(args)
    path = bench_results.write(BENCHMARK, variant, results, load_before)
    plot(results, path.with_suffix(".png"))
    print(path.read_text())


if __name__ == "__main__":
    main()
