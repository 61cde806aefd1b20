"""ClientApp: one round of local instruction tuning of the global adapter on this node's data."""

import logging

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowertune_llm import data, models, training
from flowertune_llm.config import parse_run_config

log = logging.getLogger(f"flwr.{__name__}")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = parse_run_config(context.run_config)
    partition_id, num_partitions = data.node_partition(context.node_config)
    round_config = msg.content["config"]
    server_round = int(round_config["server-round"])

    model, tokenizer, _ = models.cached_peft_model(config.model)
    models.set_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    dataset = data.load_partition(config.dataset, partition_id, num_partitions)

    result = training.train_round(
        model,
        tokenizer,
        dataset,
        config.train,
        config.model,
        learning_rate=float(round_config["learning-rate"]),
        server_round=server_round,
    )
    log.info(
        "Round %d, partition %d: train_loss %.4f over %d steps (%d tokens, %.1f s)",
        server_round,
        partition_id,
        result.train_loss,
        result.steps,
        result.tokens,
        result.seconds,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(models.get_adapter_state(model)),
            "metrics": MetricRecord(
                {
                    "train_loss": result.train_loss,
                    "num-examples": result.num_examples,
                    "num-tokens": result.tokens,
                    "step-seconds": result.step_seconds,
                }
            ),
        }
    )
    return Message(content, reply_to=msg)
