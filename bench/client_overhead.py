"""Client round overhead: the time a client round spends outside its optimizer steps.

A FlowerTune client round is: receive the global adapter, get a model and the node's data ready, run the
recipe's optimizer steps, send the adapter back. Everything but the steps is overhead. This app keeps the
base model, the formatted partition and the tokenized dataset in per-process caches
(``training.models._cache``, ``training.data._partitions``, ``training.sft._tokenized``); the upstream
FlowerTune example instead reloads the model and tokenizer and re-partitions and re-tokenizes the data
every round. This benchmark measures both, alternating round by round in one client process per model:

* The parent process plays the ServerApp: it builds the initial adapter as ``server_app.main`` does and
  encodes one train message per server round into Flower's wire format (the deflated object tree that
  ``flwr``'s push/pull paths exchange between SuperNode and ClientApp; the simulation engine pickles the
  same objects through Ray instead). It never runs a client round.
* Each model gets a fresh spawned process, like a fresh simulation actor. There a client round is: inflate
  the incoming message, call the real ``ClientApp`` (``client_app.app``, which dispatches to the registered
  ``train`` handler, which runs ``federated.client_round.train`` in-process), deflate the reply.
  Overhead = that wall time - the reply's step seconds (``protocol.TrainRes.step_seconds``).
* Mode ``cold``: the process's first round (every cache misses). Mode ``cache``: a later round, as the app
  runs. Mode ``reload``: a later round after emptying the caches that upstream does not have (see
  :data:`RELOAD_CLEARS`). Cache and reload rounds alternate (ABBA) so machine noise hits both alike.

Usage (from the repository root)::

    python -m bench.client_overhead [--rounds N] [--models builtin:tiny-llama builtin:small-llama]

Prints the results as JSON, writes them to ``bench/results/client_overhead/<models>-<N>rounds.json``
(:mod:`testbed.results`) and rewrites the results block of the "Client round overhead" section of
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Built-in models are written to $FLOWERTUNE_LLM_CACHE on first use; keep a benchmark run from filling the
# home directory when nothing is configured. Set before the spawned client processes inherit the environment.
os.environ.setdefault("FLOWERTUNE_LLM_CACHE", str(Path(tempfile.gettempdir()) / "flowertune-llm-cache"))

import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from bench import block_header
from flowertune_llm import client_app
from flowertune_llm.config import default_run_config, load_preset, parse_run_config
from flowertune_llm.federated import protocol
from flowertune_llm.training import data, models, sft
from testbed import results
from testbed.grids import train_content  # the server's train message, as the tests build it

BENCHMARK = "client_overhead"
README_BLOCK = "client-overhead"

PRESET = "quickstart"
DEFAULT_MODELS = ("builtin:tiny-llama", "builtin:small-llama")
RUN_ID = 1
CLIENT_NODE_ID = 2
NODE_CONFIG: dict[str, bool | float | int | str] = {
    "partition-id": 0,
    "num-partitions": 2,
    # Train in the ClientApp's own process, as simulation actors do. Outside Ray the app would otherwise hand
    # the round to the node's persistent worker (flowertune_llm/deploy/worker.py), another process whose caches
    # this benchmark could neither time nor empty.
    "persistent-worker": False,
}
TARGET_OVERHEAD_FRACTION = 0.10  # the target for the cached round

# What upstream FlowerTune redoes every round and this app caches. ``data._federated`` (the loaded
# FederatedDataset) stays: upstream keeps it in a module global (``FDS``) too.
RELOAD_CLEARS = {
    "training.models._cache": "base model, PEFT wrapper and tokenizer (upstream: get_model + tokenizer per round)",
    "training.data._partitions": "partition selection and prompt formatting (upstream: FDS.load_partition + rename)",
    "training.sft._tokenized": "TRL tokenization of the partition (upstream: SFTTrainer tokenizes each round)",
}


# ---------------------------------------------------------------------------------------------- the wire


@dataclass(frozen=True)
class Wire:
    """A message as Flower transports it: its object id and every object of its tree, deflated."""

    message_id: str
    contents: dict[str, bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.contents.values())


def to_wire(message: Message) -> Wire:
    """The sender's share of a transfer, as ``flwr.supernode.runtime.run_clientapp.push_message`` does it."""
    with no_object_id_recompute():
        message.metadata.__dict__["_message_id"] = message.object_id
        contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    return Wire(message.metadata.message_id, contents)


def from_wire(wire: Wire) -> Message:
    """The receiver's share, as ``run_clientapp.pull_task_input`` does it once the objects have arrived."""
    # Inflation consumes the dict it is given; the caller's copy stays reusable for the next round.
    message = inflate_object_from_contents(wire.message_id, dict(wire.contents))
    assert isinstance(message, Message)
    message.metadata.__dict__["_message_id"] = wire.message_id  # the deflated message omits its own id
    return message


# -------------------------------------------------------------------------------------- the server side


def run_config_for(model_name: str) -> dict[str, Any]:
    """The flat run config Flower would hand the app: defaults, then the quickstart recipe, then the model."""
    return default_run_config() | load_preset(PRESET) | {"model.name": model_name}


@dataclass(frozen=True)
class ServerSide:
    """What the parent prepares for one model: its size and one encoded train message per server round."""

    base_params: int
    adapter_params: int
    wires: list[Wire]  # wires[i] carries server round i + 1


def prepare_server_side(model_name: str, num_rounds: int) -> ServerSide:
    """Build the initial adapter and the train messages as ``server_app.main`` and ``AdapterFedAvg`` do."""
    config = parse_run_config(run_config_for(model_name))
    peft_model = models.build_peft_model(config.model)  # also writes the built-in model to disk on first use
    adapter_params, all_params = peft_model.get_nb_trainable_parameters()
    state = {k: v.detach().clone() for k, v in models.get_adapter_state(peft_model).items()}
    del peft_model

    # Messages take their sender from the process's task identity, which Flower sets in a real ServerApp.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK_NODE_ID, 1
    wires = []
    for server_round in range(1, num_rounds + 1):
        # The rate does not change what a round costs; the schedule's peak keeps every round alike.
        content = train_content(state, server_round, config.train.learning_rate_max)
        message = Message(
            content, dst_node_id=CLIENT_NODE_ID, message_type=protocol.TRAIN, ttl=config.strategy.round_timeout
        )
        wires.append(to_wire(message))
    return ServerSide(all_params - adapter_params, adapter_params, wires)


# -------------------------------------------------------------------------------------- the client side


@dataclass
class Phases:
    """Wall time inside the round's three big calls, filled in by :func:`timed_phases`."""

    model_s: float = 0.0
    model_cache_hit: bool = False
    data_s: float = 0.0
    train_round_s: float = 0.0
    trainer_train_s: float = 0.0  # RoundResult.seconds: the whole of trainer.train()
    gc_s: float = 0.0  # in Python's garbage collector, automatic or explicit, wherever in the round


@contextlib.contextmanager
def timed_phases() -> Iterator[Phases]:
    """Wrap the round's model, data and training calls with timers, without changing what they do.

    ``federated.client_round`` looks them up on their modules at call time, so replacing the module attributes
    is seen. Garbage collection is timed through ``gc.callbacks``, which the interpreter calls around every
    collection.
    """
    phases = Phases()
    originals = models.cached_peft_model, data.load_node_dataset, sft.train_round
    cached_peft_model, load_node_dataset, train_round = originals
    gc_started = 0.0

    def timed_model(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = cached_peft_model(*args, **kwargs)
        phases.model_s += time.perf_counter() - start
        phases.model_cache_hit = result[2]
        return result

    def timed_data(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = load_node_dataset(*args, **kwargs)
        phases.data_s += time.perf_counter() - start
        return result

    def timed_train(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = train_round(*args, **kwargs)
        phases.train_round_s += time.perf_counter() - start
        phases.trainer_train_s += result.seconds
        return result

    def timed_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal gc_started
        if phase == "start":
            gc_started = time.perf_counter()
        else:
            phases.gc_s += time.perf_counter() - gc_started

    models.cached_peft_model, data.load_node_dataset, sft.train_round = timed_model, timed_data, timed_train
    gc.callbacks.append(timed_gc)
    try:
        yield phases
    finally:
        gc.callbacks.remove(timed_gc)
        models.cached_peft_model, data.load_node_dataset, sft.train_round = originals


@dataclass(frozen=True)
class RoundSample:
    """One client round, in seconds. ``overhead_s`` is the sum of the fields ``deserialize_s`` to ``serialize_s``."""

    model: str
    mode: str  # "cold", "cache" or "reload"
    server_round: int
    model_cache_hit: bool
    round_s: float  # deserialize + handler + serialize
    step_s: float  # the reply's step seconds: forward, backward and update of every step
    overhead_s: float  # round_s - step_s
    deserialize_s: float  # inflate the incoming message
    model_s: float  # models.cached_peft_model: load or look up base model, adapter, tokenizer
    data_s: float  # data.load_node_dataset: partition and format, or look up
    trainer_setup_s: float  # train_round outside trainer.train(): SFTTrainer construction incl. tokenization
    trainer_loop_s: float  # trainer.train() outside the steps: optimizer, dataloader, callbacks
    other_s: float  # rest of the handler: dispatch, config parsing, adapter in and out, the reply Message
    serialize_s: float  # deflate the reply
    gc_s: float  # garbage collection within the round, whichever of the above it fell in (steps included)


def client_round(model_name: str, mode: str, wire: Wire, context: Context) -> RoundSample:
    """One timed client round: inflate the message, run the ClientApp on it, deflate the reply."""
    with timed_phases() as phases:
        start = time.perf_counter()
        message = from_wire(wire)
        received = time.perf_counter()
        reply = client_app.app(message, context)
        replied = time.perf_counter()
        to_wire(reply)
        end = time.perf_counter()

    if phases.train_round_s == 0.0:
        raise RuntimeError("the round trained outside this process; the timers and caches here saw none of it")
    step_s = protocol.TrainRes.from_content(reply.content).step_seconds
    if step_s is None:
        raise RuntimeError("the reply carries no step seconds: the round trained nothing")
    handler_s = replied - received
    return RoundSample(
        model=model_name,
        mode=mode,
        server_round=protocol.Header.from_content(message.content).server_round,
        model_cache_hit=phases.model_cache_hit,
        round_s=end - start,
        step_s=step_s,
        overhead_s=end - start - step_s,
        deserialize_s=received - start,
        model_s=phases.model_s,
        data_s=phases.data_s,
        trainer_setup_s=phases.train_round_s - phases.trainer_train_s,
        trainer_loop_s=phases.trainer_train_s - step_s,
        other_s=handler_s - phases.model_s - phases.data_s - phases.train_round_s,
        serialize_s=end - replied,
        gc_s=phases.gc_s,
    )


def empty_caches_upstream_lacks() -> None:
    """Empty what upstream FlowerTune rebuilds every round (:data:`RELOAD_CLEARS`)."""
    models._cache.clear()
    data._partitions.clear()
    sft._tokenized.clear()


def log_sample(sample: RoundSample) -> None:
    print(
        f"[{sample.model}] server round {sample.server_round} {sample.mode:6s}: round {sample.round_s:6.2f} s, "
        f"steps {sample.step_s:6.2f} s, overhead {sample.overhead_s:5.2f} s",
        file=sys.stderr,
        flush=True,
    )


@dataclass(frozen=True)
class ClientRun:
    process_ready_s: float  # from spawning the process to its first instruction: interpreter start + imports
    samples: list[RoundSample]


def run_client_process(model_name: str, wires: list[Wire], spawned_at: float) -> ClientRun:
    """The spawned client process's entry point."""
    process_ready_s = time.time() - spawned_at
    try:
        return ClientRun(process_ready_s, client_rounds(model_name, wires))
    except Exception:
        # An exception crosses back to the parent pickled, and one whose __init__ takes several arguments
        # (ConfigError) fails to unpickle and turns into a bare BrokenProcessPool; send the traceback as text.
        raise RuntimeError(f"client process failed:\n{traceback.format_exc()}") from None


def client_rounds(model_name: str, wires: list[Wire]) -> list[RoundSample]:
    """The cold round, then cache and reload rounds in ABBA order, each pair on the same server round."""
    context = Context(
        run_id=RUN_ID,
        node_id=CLIENT_NODE_ID,
        node_config=NODE_CONFIG,
        state=RecordDict(),
        run_config=run_config_for(model_name),
    )
    # stdout carries the benchmark's JSON; anything a library prints goes to stderr with the logs.
    with contextlib.redirect_stdout(sys.stderr):
        samples = [client_round(model_name, "cold", wires[0], context)]
        log_sample(samples[-1])
        for pair, wire in enumerate(wires[1:]):
            for mode in ("reload", "cache") if pair % 2 == 0 else ("cache", "reload"):
                if mode == "reload":
                    empty_caches_upstream_lacks()
                samples.append(client_round(model_name, mode, wire, context))
                log_sample(samples[-1])
    expected_hits = {"cold": False, "cache": True, "reload": False}
    wrong = [s for s in samples if s.model_cache_hit != expected_hits[s.mode]]
    if wrong:
        raise RuntimeError(f"model cache hit/miss not as the mode implies: {wrong[0]}")
    return samples


# ------------------------------------------------------------------------------------------- reporting

BREAKDOWN = (
    "deserialize_s", "model_s", "data_s", "trainer_setup_s", "trainer_loop_s", "other_s", "serialize_s", "gc_s"
)


def median_sample(samples: list[RoundSample]) -> dict[str, float]:
    """Per-field medians over rounds (each field on its own, so they need not add up exactly)."""
    numeric = [f.name for f in fields(RoundSample) if f.type == "float"]  # annotations are strings here
    medians = {name: statistics.median(getattr(s, name) for s in samples) for name in numeric}
    return medians | {"rounds": len(samples)}


@dataclass
class ModelResult:
    model: str
    base_params: int
    adapter_params: int
    message_bytes_down: int
    process_ready_s: float
    cold: RoundSample
    cache: dict[str, float]
    reload: dict[str, float]
    reload_over_cache_overhead: float
    # Other tenants' load only ever stretches the steps, which shrinks overhead / round. The fastest steps seen
    # (cache or reload: the same work) are the closest to an unloaded machine, so the target is judged on
    # median overhead / (median overhead + fastest steps), the larger and more honest of the two fractions.
    fastest_step_s: float
    slowest_step_s: float  # far above the fastest: other jobs competed for the CPU during this run
    cache_overhead_fraction: float  # median overhead / median round
    cache_overhead_fraction_fastest: float  # median overhead / (median overhead + fastest steps)
    target_met: bool
    samples: list[RoundSample] = field(repr=False)


def summarize(model_name: str, server: ServerSide, run: ClientRun) -> ModelResult:
    by_mode = {mode: [s for s in run.samples if s.mode == mode] for mode in ("cold", "cache", "reload")}
    cache, reload = median_sample(by_mode["cache"]), median_sample(by_mode["reload"])
    warm_steps = [s.step_s for s in by_mode["cache"] + by_mode["reload"]]
    fastest_step_s = min(warm_steps)
    fraction_fastest = cache["overhead_s"] / (cache["overhead_s"] + fastest_step_s)
    return ModelResult(
        model=model_name,
        base_params=server.base_params,
        adapter_params=server.adapter_params,
        message_bytes_down=server.wires[0].nbytes,
        process_ready_s=run.process_ready_s,
        cold=by_mode["cold"][0],
        cache=cache,
        reload=reload,
        reload_over_cache_overhead=reload["overhead_s"] / cache["overhead_s"],
        fastest_step_s=fastest_step_s,
        slowest_step_s=max(warm_steps),
        cache_overhead_fraction=cache["overhead_s"] / cache["round_s"],
        cache_overhead_fraction_fastest=fraction_fastest,
        target_met=fraction_fastest < TARGET_OVERHEAD_FRACTION,
        samples=run.samples,
    )


def recipe_settings(model_names: list[str]) -> dict[str, Any]:
    config = parse_run_config(run_config_for(model_names[0]))
    args = config.train.training_arguments
    return {
        "preset": PRESET,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "seq_length": config.train.seq_length,
        "lora_r": config.model.lora.peft_lora_r,
        "target_modules": config.model.lora.target_modules,
        "dtype": config.model.dtype,
        "dataset": config.dataset.name,
        "torch_threads": torch.get_num_threads(),
        "node_config": NODE_CONFIG,
        "reload_clears": RELOAD_CLEARS,
    }


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%"


def results_block(report: dict[str, Any], models: list[ModelResult], results_file: str) -> str:
    meta, settings = report["meta"], report["settings"]
    machine, load = meta["machine"], meta["load"]
    measured_on = (
        f"{machine['cpu']} ({machine['cores']} cores, {settings['torch_threads']} torch threads, GPU: "
        f"{machine['gpu'] or 'none'}), shared with other jobs: load average {load['before'][0]} before, "
        f"{load['after'][0]} after. Recipe `{settings['preset']}`: {settings['max_steps']} steps, "
        f"batch {settings['per_device_train_batch_size']}, seq-length {settings['seq_length']}, "
        f"LoRA r={settings['lora_r']} on all linear layers, {settings['dtype']}"
    )
    lines = [
        *block_header(meta, measured_on, results_file),
        "Medians over rounds. Overhead = round − optimizer steps. \"% at fastest steps\" = median overhead / "
        "(median overhead + the fastest steps seen for that model): what the share would be without other jobs "
        "slowing the steps down. Ratio = reload overhead / cache overhead.",
        "",
        "| model | params (base + adapter) | mode | rounds | round s | steps s | overhead s | overhead % of round "
        "| overhead % at fastest steps | ratio reload/cache |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in models:
        params = f"{fmt_params(r.base_params)} + {fmt_params(r.adapter_params)}"
        rows = [("cache", r.cache), ("reload", r.reload), ("cold (1st round)", asdict(r.cold) | {"rounds": 1})]
        for mode, m in rows:
            ratio = f"**{r.reload_over_cache_overhead:.1f}×**" if mode == "reload" else ""
            lines.append(
                f"| {r.model} | {params} | {mode} | {m['rounds']} | {m['round_s']:.2f} | {m['step_s']:.2f} "
                f"| {m['overhead_s']:.2f} | {percent(m['overhead_s'], m['round_s'])} "
                f"| {percent(m['overhead_s'], m['overhead_s'] + r.fastest_step_s)} | {ratio} |"
            )
    lines += [
        "",
        "Where the overhead goes (medians, seconds; GC is garbage collection anywhere in the round, mostly inside "
        "the columns before it):",
        "",
        "| model | mode | deserialize | model | data | trainer set-up | trainer loop | other handler | serialize "
        "| GC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in models:
        for mode, m in (("cold", asdict(r.cold)), ("cache", r.cache), ("reload", r.reload)):
            lines.append(f"| {r.model} | {mode} | " + " | ".join(f"{m[k]:.3f}" for k in BREAKDOWN) + " |")
    lines += ["", "Fixed per-process cost, paid once by a fresh client process before its first round:", ""]
    for r in models:
        lines.append(
            f"- {r.model}: {r.process_ready_s:.1f} s from spawn to ready (interpreter start and imports); "
            f"train message {r.message_bytes_down / 1024:.0f} KiB on the wire."
        )
    target = f"{TARGET_OVERHEAD_FRACTION:.0%}"
    lines += ["", f"Target: with the cache, overhead < {target} of the round (judged at fastest steps):", ""]
    for r in models:
        verdict = "**met**" if r.target_met else "**not met**"
        lines.append(
            f"- {r.model}: {100 * r.cache_overhead_fraction_fastest:.1f}% at fastest steps "
            f"({100 * r.cache_overhead_fraction:.1f}% of the median round) → {verdict}. Steps took "
            f"{r.fastest_step_s:.2f}–{r.slowest_step_s:.2f} s across rounds; a wide range means other jobs "
            "competed for the CPU, and even the fastest may be slower than on an idle machine."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="cache rounds and reload rounds per model (default 6)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model names (run-config model.name)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def variant(model_names: list[str], rounds: int) -> str:
    """``tiny-llama-and-small-llama-6rounds``: the models (last part of each name) and the rounds per mode."""
    return "-and-".join(Path(name.split(":")[-1]).name for name in model_names) + f"-{rounds}rounds"


def main() -> None:
    args = parse_args()
    load_before = results.load()

    measured = []
    for model_name in args.models:
        # One cold round plus one cache and one reload round per pair; each pair shares a server round.
        server = prepare_server_side(model_name, num_rounds=args.rounds + 1)
        spawned_at = time.time()
        # A fresh process per model, so each model's first round is a true cold start, as in a new actor.
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
            run = client.submit(run_client_process, model_name, server.wires, spawned_at).result()
        measured.append(summarize(model_name, server, run))

    payload = {
        "settings": recipe_settings(args.models),
        "target_overhead_fraction": TARGET_OVERHEAD_FRACTION,
        "models": [asdict(r) for r in measured],
    }
    path = results.write(BENCHMARK, variant(args.models, args.rounds), payload, load_before)
    report = json.loads(path.read_text())
    raw = str(path.relative_to(results.README.parent))
    results.rewrite_readme_block(README_BLOCK, results_block(report, measured, raw))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
