"""ServerApp: federated averaging of LoRA/DoRA adapters (or, training off, of whole models) group by group,
with a cosine learning-rate schedule across rounds."""

import gc
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flowertune_llm.config import RunConfig, parse_run_config, to_flat_dict
from flowertune_llm.federated.run_directory import RunDirectory
from flowertune_llm.federated.strategy import StreamingFedAvg
from flowertune_llm.observe import report
from flowertune_llm.observe.profiling import OFF, PROFILE_FILE, Recorder
from flowertune_llm.training import data, models
from flowertune_llm.units import MiB
from flowertune_llm.weights.exchange import Exchange
from flowertune_llm.weights.tensors import dtype_name, specs_of

log = logging.getLogger(f"flwr.{__name__}")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # Everything that can be checked without loading a model is checked first.
    config = parse_run_config(context.run_config)
    if not config.exchanges_full_weights:
        models.check_target_modules(config.model)
    if not config.aggregation_only:
        data.check_local_dataset(config.dataset)

    run_dir = RunDirectory.create(config.output.root, context.run_id, to_flat_dict(config))
    log.info("Run directory: %s", run_dir.path)
    exchange, initial = _global_model(config, run_dir)
    log.info("Exchanging %s (aggregation.mode=%s)", exchange.describe(), config.aggregation.mode)

    profile = Recorder("server", run_dir.path / PROFILE_FILE) if config.profile.enabled else OFF
    strategy = StreamingFedAvg(config, run_dir, exchange, profile)
    try:
        final = strategy.run(grid, initial)
    finally:
        profile.close()
    if profile.enabled:
        summary = report.write_summary(run_dir.path, profile.events)
        log.info("Profile (flowertune-llm profile %s):\n%s", context.run_id, report.format_tables(summary))

    if not config.aggregation_only:
        losses = [f"{r.train_loss:.4f}" for r in strategy.history]
        log.info("Train loss by round: %s", ", ".join(losses))
    log.info("Communication: %.2f MiB in total", strategy.total_bytes / MiB)
    log.info("Final %s: %s", exchange.label, final)
    log.info("Run directory: %s", run_dir.path)


def _global_model(config: RunConfig, run_dir: RunDirectory) -> tuple[Exchange, Path | None]:
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
    # The global adapter starts as the PEFT initialisation of the base model (LoRA B = 0: a no-op adapter).
    peft_model = models.build_peft_model(config.model)
    state = models.get_adapter_state(peft_model)
    del peft_model
    gc.collect()
    exchange = Exchange.for_adapter(config, specs_of(state), models.lora_config(config.model))
    return exchange, exchange.write(run_dir.checkpoint_dir(0), state)
