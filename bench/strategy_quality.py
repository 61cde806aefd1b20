"""What a strategy or an update format does to quality: the quickstart's final held-out loss and its bytes.

    python -m bench.strategy_quality [--seeds 42 7] [--rounds 8]

Each row is a real ``flwr run`` of the quickstart preset (``configs/quickstart.toml``: the built-in tiny Llama,
LoRA r=8 on every projection, 8 rounds, the built-in instruction set) on one simulation SuperLink with Flower's
default federation (2 SuperNodes), with federated evaluation of the last round's global adapter
(``eval.every-round`` = the rounds, ``eval.fraction`` 0.1). Varied: ``strategy.name`` (each with its
defaults, float32 updates) and ``exchange.update-format`` (FedAvg). Recorded: the last round's held-out loss
and train loss, and the bytes each way over the run (history.json).

Prints JSON, writes ``bench/results/strategy_quality/quickstart-seeds-<S...>.json`` (:mod:`testbed.results`)
and the block between the ``strategy-quality`` markers in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench import block_header
from testbed import results
from testbed.flower import simulation_superlink

BENCHMARK = "strategy_quality"
README_BLOCK = "strategy-quality"
VARIANTS = [
    ("fedavg", "float32"), ("fedavgm", "float32"), ("fedadam", "float32"), ("fedyogi", "float32"),
    ("fedadagrad", "float32"), ("fedprox", "float32"), ("fedavg", "bfloat16"), ("fedavg", "int8"),
]  # fmt: skip


def run_once(link, output_dir: Path, strategy: str, update_format: str, seed: int, rounds: int) -> dict:
    config = (f"preset='quickstart' output.dir='{output_dir}' num-server-rounds={rounds} train.seed={seed} "
              f"strategy.name='{strategy}' exchange.update-format='{update_format}' eval.every-round={rounds} "
              "eval.fraction=0.1")  # fmt: skip
    result = link.run_app(results.ROOT, run_config=config)
    history = json.loads((output_dir / str(result.run_id) / "history.json").read_text())
    last = history[-1]
    return {
        "strategy": strategy, "update_format": update_format, "seed": seed, "rounds": rounds,
        "final_eval_loss": last["eval_loss"], "final_train_loss": last["train_loss"],
        "first_train_loss": history[0]["train_loss"],
        "bytes_down": sum(r["bytes_down"] for r in history), "bytes_up": sum(r["bytes_up"] for r in history),
        "bytes_up_last_round": last["bytes_up"], "bytes_down_last_round": last["bytes_down"],
    }  # fmt: skip


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    baseline = [r for r in rows if (r["strategy"], r["update_format"]) == ("fedavg", "float32")]
    base_bytes = statistics.mean(r["bytes_down"] + r["bytes_up"] for r in baseline)
    for strategy, update_format in VARIANTS:
        mine = [r for r in rows if (r["strategy"], r["update_format"]) == (strategy, update_format)]
        if not mine:
            continue
        table.append({
            "strategy": strategy, "update_format": update_format, "seeds": [r["seed"] for r in mine],
            "final_eval_loss": [round(r["final_eval_loss"], 4) for r in mine],
            "final_eval_loss_mean": round(statistics.mean(r["final_eval_loss"] for r in mine), 4),
            "bytes_total_over_fedavg_float32": round(statistics.mean(r["bytes_down"] + r["bytes_up"] for r in mine) / base_bytes, 3),
            "bytes_up_last_round": mine[0]["bytes_up_last_round"],
        })  # fmt: skip
    return table


def write_readme_block(payload: dict, path: Path) -> None:
    meta = payload["meta"]
    lines = [
        *block_header(meta, f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores",
                      str(path.relative_to(results.README.parent))),
        f"The quickstart preset, {payload['rounds']} rounds, Flower's default federation (2 SuperNodes); the last "
        f"round's held-out loss (eval.fraction 0.1) per seed. Bytes: the run's total both ways, against FedAvg "
        "in float32.",
        "",
        "| strategy | update format | final held-out loss (per seed) | mean | bytes vs fedavg/float32 | bytes up, last round |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in payload["table"]:
        losses = ", ".join(f"{loss:.4f} (seed {seed})" for loss, seed in zip(row["final_eval_loss"], row["seeds"], strict=True))
        lines.append(f"| {row['strategy']} | {row['update_format']} | {losses} | {row['final_eval_loss_mean']:.4f} | "
                     f"{row['bytes_total_over_fedavg_float32']:.3f}x | {row['bytes_up_last_round']:,} |")  # fmt: skip
    results.rewrite_readme_block(README_BLOCK, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    load_before = results.load()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-strategy-quality-") as tmp, simulation_superlink(Path(tmp)) as link:
        for seed in args.seeds:
            for strategy, update_format in VARIANTS:
                print(f"{strategy} {update_format} seed {seed} ...", file=sys.stderr, flush=True)
                rows.append(run_once(link, Path(tmp) / "runs", strategy, update_format, seed, args.rounds))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    payload = {"rounds": args.rounds, "runs": rows, "table": summarize(rows)}
    variant = f"quickstart-seeds-{'-'.join(map(str, args.seeds))}"
    path = results.write(BENCHMARK, variant, payload, load_before)
    write_readme_block(results.read(BENCHMARK, variant), path)
    print(path.read_text())


if __name__ == "__main__":
    main()
