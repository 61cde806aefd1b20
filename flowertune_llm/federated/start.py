"""How a run starts: its config checked and recorded, what it exchanges, the global model before round 1, or
where a resumed run goes on. Everything that can be refused is refused before a model loads."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import torch

from flowertune_llm.config import ConfigError, RunConfig, to_flat_dict
from flowertune_llm.federated import resume
from flowertune_llm.federated.resume import Resume
from flowertune_llm.federated.run_directory import RunDirectory
from flowertune_llm.training import data, models
from flowertune_llm.weights.exchange import Exchange
from flowertune_llm.weights.tensors import dtype_name, specs_of

log = logging.getLogger(f"flwr.{__name__}")


class _ConfigErrorsInOneLine(logging.Filter):
    """Flower logs a ServerApp's exception with its whole traceback; a refused run config is one line naming the
    key (what `flwr log` and `flwr ls`'s status details then show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ConfigError):
            record.msg, record.args = "Run config refused: %s", (error,)
            record.exc_info, record.exc_text = None, None
        return True


def log_config_errors_in_one_line() -> None:
    """Install :class:`_ConfigErrorsInOneLine` on Flower's logger (once per process)."""
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _ConfigErrorsInOneLine) for f in flower.filters):
        flower.addFilter(_ConfigErrorsInOneLine())


def check(config: RunConfig) -> Path | None:
    """What can be checked without loading a model; returns the run to resume, if any (its config compatible)."""
    if not config.exchanges_full_weights:
        models.check_target_modules(config.model)
        if config.model.init_adapter:
            models.check_init_adapter(config.model)
    if not config.aggregation_only:
        data.check_local_dataset(config.dataset)
    if not config.resume_from:
        return None
    source = resume.locate(config.resume_from, config.output.root)
    resume.check_compatible(json.loads((source / "run_config.json").read_text()), recorded_config(config), source)
    return source


def run_directory(config: RunConfig, run_id: int, source: Path | None) -> tuple[RunDirectory, Resume | None]:
    """The new run's directory, set up to continue ``source`` when the run resumes one."""
    run_dir = RunDirectory.create(config.output.root, run_id, recorded_config(config))
    log.info("Run directory: %s", run_dir.path)
    if source is None:
        return run_dir, None
    start = resume.prepare(source, recorded_config(config), config.num_server_rounds, run_dir.path)
    log.info("Resuming %s after round %d (its history and checkpoint copied here)", source, start.round)
    return run_dir, start


def recorded_config(config: RunConfig) -> dict:
    """The resolved config as run_config.json keeps it: every local path absolute (the ServerApp runs in the
    SuperLink's working directory, so a relative one would mean nothing later)."""
    flat = to_flat_dict(config)
    flat["output.dir"] = str(config.output.root)
    for key in ("model.name", "model.init-adapter", "static.dataset.name"):
        path = Path(str(flat[key])).expanduser()
        if flat[key] and not str(flat[key]).startswith("builtin:") and path.exists():
            flat[key] = str(path.resolve())
    if config.resume_from:
        flat["resume-from"] = str(resume.locate(config.resume_from, config.output.root))
    return flat


def global_model(config: RunConfig, run_dir: RunDirectory, write_initial: bool = True) -> tuple[Exchange, Path | None]:
    """What the run exchanges, and where the global model before round 1 is (None: on the nodes already)."""
    if config.exchanges_full_weights:
        # Only the safetensors headers are read: the server never holds the model.
        specs, files = models.weight_manifest(config.model.name)
        stored = sorted({dtype_name(spec.dtype) for spec in specs.values()})
        if stored != [config.model.dtype]:
            log.info(
                "Weights travel and are saved in their stored dtype (%s); model.dtype=%s applies to loading for "
                "training only", ", ".join(stored), config.model.dtype,
            )  # fmt: skip
        return Exchange.for_full_model(config, specs, files), None
    # The global adapter starts as the PEFT initialisation of the base model (LoRA B = 0: a no-op adapter),
    # whose LoRA A is drawn at random: seeded, so the same seed starts every run from the same adapter.
    torch.manual_seed(config.train.seed)
    peft_model = models.build_peft_model(config.model)
    state = models.get_adapter_state(peft_model)
    del peft_model
    gc.collect()
    exchange = Exchange.for_adapter(config, specs_of(state), models.lora_config(config.model))
    if not write_initial:  # a resumed run starts from its kept checkpoint
        return exchange, None
    if config.model.init_adapter:
        state = models.load_init_adapter(config.model, specs_of(state))
        log.info("Round 1 starts from the adapter in %s", config.model.init_adapter)
    return exchange, exchange.write(run_dir.checkpoint_dir(0), state)


def base_model(config: RunConfig) -> Path | None:
    """The model a full-model run's nodes start from, when a server optimizer needs it on the server too (it
    steps from the global model, and in round 1 the server sends none: the nodes hold it)."""
    if not (config.exchanges_full_weights and config.strategy.has_server_optimizer):
        return None
    log.info("strategy.name=%s steps from the global model: reading the base model's weights from %s",
             config.strategy.name, config.model.name)  # fmt: skip
    return models.local_weights(config.model.name)
