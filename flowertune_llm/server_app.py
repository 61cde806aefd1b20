"""ServerApp: federated averaging of LoRA/DoRA adapters with a cosine learning-rate schedule across rounds."""

import gc
import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flowertune_llm import data, models, profile_report
from flowertune_llm.checkpoint import RunDirectory
from flowertune_llm.config import parse_run_config, to_flat_dict
from flowertune_llm.profiling import OFF, PROFILE_FILE, Recorder
from flowertune_llm.strategy import AdapterFedAvg

log = logging.getLogger(f"flwr.{__name__}")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # Everything that can be checked without loading a model is checked first.
    config = parse_run_config(context.run_config)
    models.check_target_modules(config.model)
    data.check_local_dataset(config.dataset)

    run_dir = RunDirectory.create(config.output.root, context.run_id, to_flat_dict(config))
    log.info("Run directory: %s", run_dir.path)

    # The global adapter starts as the PEFT initialisation of the base model (LoRA B = 0: a no-op adapter).
    peft_model = models.build_peft_model(config.model)
    initial_state = {k: v.numpy() for k, v in models.get_adapter_state(peft_model).items()}
    del peft_model
    gc.collect()

    profile = Recorder("server", run_dir.path / PROFILE_FILE) if config.profile.enabled else OFF
    strategy = AdapterFedAvg(config, run_dir, models.lora_config(config.model), profile)
    try:
        strategy.run(grid, initial_state)
    finally:
        profile.close()
    if profile.enabled:
        summary = profile_report.write_summary(run_dir.path, profile.events)
        log.info("Profile (flowertune-llm profile %s):\n%s", context.run_id, profile_report.format_tables(summary))

    losses = [f"{r.train_loss:.4f}" for r in strategy.history]
    log.info("Train loss by round: %s", ", ".join(losses))
    log.info("Communication: %.2f MB in total", strategy.total_bytes / 2**20)
    log.info("Final adapter: %s", run_dir.checkpoint_dir(config.num_server_rounds))
    log.info("Run directory: %s", run_dir.path)
