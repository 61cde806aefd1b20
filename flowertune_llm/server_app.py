"""ServerApp: federated averaging of LoRA/DoRA adapters (or, training off, of whole models) group by group,
FedAvg or a server optimizer on it, with a cosine learning-rate schedule across rounds (federated/start.py sets a run up, federated/strategy.py
runs it)."""

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flowertune_llm.config import parse_run_config
from flowertune_llm.federated import start
from flowertune_llm.federated.strategy import StreamingStrategy, describe_strategy
from flowertune_llm.observe import report
from flowertune_llm.observe.profiling import OFF, PROFILE_FILE, Recorder
from flowertune_llm.training.partitions import describe_partitioning
from flowertune_llm.units import MiB

log = logging.getLogger(f"flwr.{__name__}")

app = ServerApp()
start.log_config_errors_in_one_line()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = parse_run_config(context.run_config)
    source = start.check(config)  # everything that can be refused without loading a model
    run_dir, resumed = start.run_directory(config, context.run_id, source)
    exchange, initial = start.global_model(config, run_dir, write_initial=resumed is None)
    log.info("Exchanging %s (aggregation.mode=%s)", exchange.describe(), config.aggregation.mode)
    log.info("Strategy: %s", describe_strategy(config, exchange))
    if not config.aggregation_only:
        log.info("Partitioning: %s", describe_partitioning(config.partition))

    profile = Recorder("server", run_dir.path / PROFILE_FILE) if config.profile.enabled else OFF
    strategy = StreamingStrategy(config, run_dir, exchange, profile, resume=resumed, base=start.base_model(config))
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
