"""One client round: load (or reuse) the model, take the global adapter, train, hand the adapter back.

Runs inside the ClientApp process in simulation (whose actors live for the whole run) and inside the
node's persistent worker in deployment (see worker.py), so the model is loaded once per process either way.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from flwr.app import ArrayRecord, MetricRecord, RecordDict

from flowertune_llm import data, models, training
from flowertune_llm.config import parse_run_config
from flowertune_llm.profiling import Profiler

log = logging.getLogger(f"flwr.{__name__}")


def train(content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any], profile: Profiler) -> RecordDict:
    config = parse_run_config(run_config)
    round_config = content["config"]
    server_round = int(round_config["server-round"])

    # Data first: a node whose data is missing fails in seconds, not after loading a model.
    with profile.span("data_load") as span:
        dataset = data.load_node_dataset(config.dataset, node_config)
        span["examples"] = len(dataset)
    with profile.span("model_load") as span:
        model, tokenizer, span["cache_hit"] = models.cached_peft_model(config.model)
    with profile.span("adapter_in"):
        models.set_adapter_state(model, content["arrays"].to_torch_state_dict())

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
    return RecordDict({"arrays": arrays, "metrics": metrics})
