"""Compressed updates on the Deployment Engine: bytes and seconds of a round with a 92 MB adapter per format.

    python -m bench.update_formats [--formats float32 bfloat16 int8] [--rounds 3]

The finance recipe's adapter (DoRA r=32 on the MLP projections of SmolLM2-1.7B: 24.0M float32 values,
91.7 MiB) on a model of SmolLM2-1.7B's shapes with random weights (hidden 2048, intermediate 8192, 24 layers;
a 256-token vocabulary, which the adapter does not touch), loaded in 4 bits by the server to plan the
exchange. Aggregation-only rounds (``max-steps=0``: the nodes hold and return the adapter, so what is timed
is the exchange, not training) on :class:`~flowertune_llm.deploy.federation.LocalFederation`: a SuperLink and
2 SuperNodes on 127.0.0.1 with TLS and SuperNode authentication, one federation per format, profiled.

Round 1 sends the weights down in every format (no node holds a model yet); from round 2 the change goes
down and up. Per round: the bytes each way (history.json) and the round's wall time. A round on the
Deployment Engine also costs what no byte count changes: the SuperExec polls for messages (every 3 s by
default; every 0.2 s here, ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, else its jitter swamps the transfer), a
ClientApp process starts per message. So a **floor** run makes the same exchanges
with a 1-rank, one-module adapter of the built-in tiny model (a few KiB), and a format's **transfer time**
is its round time less the floor's (medians of rounds 2 to N). The values sent in an aggregation-only round
are all-zero changes; neither format's size nor its coding time depends on the values.

Prints JSON and writes ``bench/results/update_formats/finance-dora-92mib.json`` (:mod:`testbed.results`).
Target (issue 13): from round 2, bfloat16 at most 0.6x and int8 at most 0.4x float32's transfer time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from testbed import results

BENCHMARK = "update_formats"
NODES = 2
SHAPES = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
          "num_key_value_heads": 32, "vocab_size": 256, "max_position_embeddings": 512, "tie_word_embeddings": True}  # fmt: skip
# Flower's SuperExec looks for new work every 3 s: up to 3 s of waiting per message, which on 127.0.0.1 is
# more than moving 92 MB takes. Polled every 0.2 s, as the deployment tests do, the bytes show.
FAST_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
FLOOR = ("model.name='builtin:tiny-llama' model.quantization=4 model.dtype='bfloat16' model.lora.peft-lora-r=1 "
         "model.lora.target-modules='q_proj'")  # fmt: skip
ADAPTER = ("model.quantization=4 model.dtype='bfloat16' model.lora.peft-lora-r=32 model.lora.peft-lora-alpha=64 "
           "model.lora.target-modules='down_proj,up_proj,gate_proj' model.lora.use-dora=true")  # fmt: skip


def build_model(directory: Path) -> Path:
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: half the memory of building in float32
    try:
        LlamaForCausalLM(LlamaConfig(**SHAPES)).save_pretrained(directory)
    finally:
        torch.set_default_dtype(previous)
    return directory


def run(update_format: str, rounds: int, model_settings: str, workdir: Path) -> dict:
    from flowertune_llm.deploy.federation import LocalFederation
    from flowertune_llm.observe.report import load_profile
    from testbed.flower import timed_federation_run

    node_configs = [{"state-dir": str(workdir / "node-state")} for _ in range(NODES)]
    config = (f"{model_settings} train.training-arguments.max-steps=0 num-server-rounds={rounds} "
              f"train.save-every-round={rounds} strategy.fraction-train=1.0 exchange.update-format='{update_format}' "
              f"output.dir='{workdir / 'runs'}' profile.enabled=true")  # fmt: skip
    federation = LocalFederation(workdir / "federation", NODES, tls=True, auth=True, node_configs=node_configs,
                                 env=FAST_POLL)  # fmt: skip
    result, wall = timed_federation_run(federation, results.ROOT, config, timeout=3600)
    if not result.ok:
        sys.exit(f"{update_format}: the run failed: {result.details}")
    run_dir = workdir / "runs" / str(result.run_id)
    history = json.loads((run_dir / "history.json").read_text())
    events = load_profile(run_dir / "profile.jsonl").events
    handlers: dict[int, float] = {}
    for event in events:  # the slowest node's handling (storing, rebuilding, coding), for the record
        if event["kind"] == "span" and event["name"] == "handler" and event["node"] != "server":
            handlers[event["round"]] = max(handlers.get(event["round"], 0.0), event["seconds"])
    rows = [{"round": record["round"], "bytes_down": record["bytes_down"], "bytes_up": record["bytes_up"],
             "seconds": round(record["seconds"], 2), "node_handler_seconds_max": round(handlers.get(record["round"], 0.0), 2),
             "aggregated": len(record["aggregated"])} for record in history]  # fmt: skip
    return {"update_format": update_format, "run_seconds": round(wall, 1), "rounds": rows}


def later(run: dict, key: str) -> float:
    """The median over rounds 2..N: changes both ways (round 1 sends the weights down in every format)."""
    return statistics.median(r[key] for r in run["rounds"][1:])


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=["float32", "bfloat16", "int8"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/flowertune-update-formats"))
    args = parser.parse_args()
    if args.formats[0] != "float32":
        parser.error("--formats: list float32 first, the baseline")
    load_before = results.load()
    model = build_model(args.work / "smollm2-1.7b-shaped")
    payload = {"config": {"nodes": NODES, "tls": True, "supernode_auth": True, "shapes": SHAPES, "adapter": ADAPTER,
                          "floor": FLOOR}, "runs": []}  # fmt: skip
    plan = [("floor", "float32", FLOOR)] + [(f, f, f"model.name='{model}' {ADAPTER}") for f in args.formats]
    for label, update_format, settings in plan:
        print(f"{label} ...", file=sys.stderr, flush=True)
        workdir = args.work / f"run-{label}"
        shutil.rmtree(workdir, ignore_errors=True)
        payload["runs"].append({"label": label, **run(update_format, args.rounds, settings, workdir)})
        print(json.dumps(payload["runs"][-1]), file=sys.stderr, flush=True)
        shutil.rmtree(workdir, ignore_errors=True)

    floor, base = payload["runs"][0], payload["runs"][1]
    floor_seconds = later(floor, "seconds")
    payload["floor_round_seconds"] = floor_seconds
    payload["from_round_2"] = {
        run["label"]: {
            "round_seconds": later(run, "seconds"), "transfer_seconds": round(later(run, "seconds") - floor_seconds, 2),
            "bytes_over_float32": round(later(run, "bytes_up") / later(base, "bytes_up"), 3),
            "round_seconds_over_float32": round(later(run, "seconds") / later(base, "seconds"), 3),
            "transfer_seconds_over_float32": round((later(run, "seconds") - floor_seconds) / (later(base, "seconds") - floor_seconds), 3),
        } for run in payload["runs"][1:]
    }  # fmt: skip
    path = results.write(BENCHMARK, "finance-dora-92mib", payload, load_before)
    print(path.read_text())


if __name__ == "__main__":
    main()
