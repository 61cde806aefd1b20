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
    round_config = msg.content["config"]
    server_round = int(round_config["server-round"])

    model, tokenizer, _ = models.cached_peft_model(config.model)
    models.set_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    dataset = data.load_node_dataset(config.dataset, context.node_config)

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
        "Round %d: train_loss %.4f over %d steps on %d examples (%d tokens, %.1f s)",
        server_round,
        result.train_loss,
        result.steps,
        result.num_examples,
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
