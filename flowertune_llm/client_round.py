"""A node's side of a round: take the global weights, train, hand the update back group by group.

A round reaches a node as up to three kinds of message (see strategy.py): ``train.receive`` with a group
of the global model, ``train`` (perhaps with the last group) to train and answer with the first group of
the update, and ``train.send`` for each further group. With ``max-steps=0`` the node trains nothing and
loads no data, tokenizer or model: it answers with the weights it holds.

Runs inside the ClientApp process in simulation (whose actors live for the whole run) and inside the
node's persistent worker in deployment (see worker.py), so the model is loaded once per process either way.
Weights between messages live on the node's disk (node_state.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from flowertune_llm import data, models, training
from flowertune_llm.config import RunConfig, parse_run_config
from flowertune_llm.exchange import RECEIVE, SEND
from flowertune_llm.node_state import NodeState
from flowertune_llm.profiling import Profiler
from flowertune_llm.transport import from_record, specs_to_json, to_record

log = logging.getLogger(f"flwr.{__name__}")

MODEL_PATH_KEY = "model-path"  # node config: this node's own copy of the model (aggregation-only, full weights)
WEIGHT_KEY = "aggregation-weight"  # node config: this node's FedAvg weight in an aggregation-only run


def handle(
    message_type: str,
    content: RecordDict,
    run_config: Mapping[str, Any],
    node_config: Mapping[str, Any],
    run_id: int,
    node_id: int,
    profile: Profiler,
) -> RecordDict:
    """Answer one message of a round (its type says which part); returns the reply's content."""
    node = NodeState.open(run_id, node_id, node_config)
    if message_type == RECEIVE:
        return receive(content, node)
    if message_type == SEND:
        return send(content, node)
    return train(content, run_config, node_config, node, profile)


def receive(content: RecordDict, node: NodeState) -> RecordDict:
    """``train.receive``: store one group of the global model."""
    _store_group(content, node)
    return RecordDict({"metrics": MetricRecord({"stored-bytes": content["arrays"].count_bytes()})})


def _store_group(content: RecordDict, node: NodeState) -> None:
    config = content["config"]
    index = int(config["group"])
    if index == 0:
        node.begin_round(int(config["server-round"]))
    node.receive(
        int(config["server-round"]),
        index,
        int(config["groups"]),
        from_record(content["arrays"]),
        str(config["manifest"]) if "manifest" in config else None,
    )


def train(
    content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any], node: NodeState, profile: Profiler
) -> RecordDict:
    """``train``: take the global weights, train on this node's data, answer with the update's first group."""
    config = parse_run_config(run_config)
    round_config = content["config"]
    server_round = int(round_config["server-round"])
    if "arrays" in content:
        _store_group(content, node)
    else:
        node.begin_round(server_round)
    received = node.received(server_round)

    if config.aggregation_only:
        metrics = _hold(config, node_config, node, server_round, received)
    else:
        if received is None:
            raise ValueError(f"round {server_round}: the train message came without the global adapter")
        metrics = _train(config, node_config, node, server_round, received, float(round_config["learning-rate"]), profile)

    with node.source(server_round) as source, profile.span("adapter_out"):
        arrays = to_record(source.group(list(round_config["reply-keys"])))
        manifest = specs_to_json(source.specs)
    return RecordDict({"arrays": arrays, "metrics": metrics, "config": ConfigRecord({"manifest": manifest})})


def send(content: RecordDict, node: NodeState) -> RecordDict:
    """``train.send``: one more group of this round's update."""
    config = content["config"]
    with node.source(int(config["server-round"])) as source:
        return RecordDict({"arrays": to_record(source.group(list(config["keys"])))})


def _hold(config: RunConfig, node_config: Mapping[str, Any], node: NodeState, server_round: int, received) -> MetricRecord:
    """Aggregation-only: serve what the server sent, or else (a full model's first round) the node's own copy."""
    if received is not None:
        node.serve_from(server_round, received.directory)
    else:
        if not config.exchanges_full_weights:
            raise ValueError(f"round {server_round}: the train message came without the global adapter")
        node.serve_from(server_round, own_weights(config, node_config))
    weight = float(node_config.get(WEIGHT_KEY, 1.0))
    if not weight > 0:
        raise data.NodeConfigError(f"node config {WEIGHT_KEY}={weight}: must be > 0")
    return MetricRecord({"weight": weight})


def own_weights(config: RunConfig, node_config: Mapping[str, Any]) -> Path:
    """The node's copy of ``model.name`` (or of its ``model-path``) as local safetensors files."""
    if MODEL_PATH_KEY in node_config:
        path = Path(str(node_config[MODEL_PATH_KEY])).expanduser().resolve()
        if not path.is_dir():
            raise data.NodeConfigError(f"node config {MODEL_PATH_KEY}='{path}': no such directory")
        return path
    return models.local_weights(config.model.name)


def _train(
    config: RunConfig,
    node_config: Mapping[str, Any],
    node: NodeState,
    server_round: int,
    received,
    learning_rate: float,
    profile: Profiler,
) -> MetricRecord:
    # Data first: a node whose data is missing fails in seconds, not after loading a model.
    with profile.span("data_load") as span:
        dataset = data.load_node_dataset(config.dataset, node_config)
        span["examples"] = len(dataset)
    with profile.span("model_load") as span:
        model, tokenizer, span["cache_hit"] = models.cached_peft_model(config.model)
    with profile.span("adapter_in"), received:
        models.set_adapter_state(model, received.state())

    with profile.span("train") as span:
        result = training.train_round(
            model, tokenizer, dataset, config.train, config.model, learning_rate=learning_rate, server_round=server_round
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
    node.serve_from(server_round, node.save_update(server_round, models.get_adapter_state(model)))
    return MetricRecord(
        {
            "weight": result.num_examples,
            "train_loss": result.train_loss,
            "num-examples": result.num_examples,
            "num-tokens": result.tokens,
            "step-seconds": result.step_seconds,
        }
    )
