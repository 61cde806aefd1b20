"""ClientApp: one round of local instruction tuning of the global adapter on this node's data."""

import logging

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowertune_llm import data, models, profiling, training
from flowertune_llm.config import parse_run_config

log = logging.getLogger(f"flwr.{__name__}")

app = ClientApp(mods=[profiling.profiling_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = parse_run_config(context.run_config)
    round_config = msg.content["config"]
    server_round = int(round_config["server-round"])
    profile = profiling.current()  # a no-op unless profile.enabled

    with profile.span("model_load") as span:
        model, tokenizer, span["cache_hit"] = models.cached_peft_model(config.model)
    with profile.span("adapter_in"):
        models.set_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    with profile.span("data_load") as span:
        dataset = data.load_node_dataset(config.dataset, context.node_config)
        span["examples"] = len(dataset)

    with profile.span("train") as span:
        result = training.train_round(
            model,
            tokenizer,
            dataset,
            config.train,
            config.model,
            learning_rate=float(round_config["learning-rate"]),
            server_round=server_round,
        )
        span.update(
            steps=result.steps,
            tokens=result.tokens,
            tokenize_seconds=result.prepare_seconds,
            step_seconds=result.step_seconds,
            tokens_per_second=result.tokens / result.step_seconds if result.step_seconds else None,
        )
    log.info(
        "Round %d: train_loss %.4f over %d steps on %d examples (%d tokens, %.1f s)",
        server_round,
        result.train_loss,
        result.steps,
        result.num_examples,
        result.tokens,
        result.seconds,
    )
    with profile.span("adapter_out"):
        arrays = ArrayRecord(models.get_adapter_state(model))
    metrics = MetricRecord(
        {
            "train_loss": result.train_loss,
            "num-examples": result.num_examples,
            "num-tokens": result.tokens,
            "step-seconds": result.step_seconds,
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
