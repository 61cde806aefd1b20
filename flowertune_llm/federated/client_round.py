"""A node's side of a round: take the global weights, train, hand the update back group by group.

A round reaches a node as up to three kinds of message (federated/protocol.py): ``train.receive`` with a
group of the global model, ``train`` (perhaps with the last group) to train and answer with the first
group of the update, and ``train.send`` for each further group. With ``max-steps=0`` the node trains
nothing and loads no data, tokenizer or model: it answers with the weights it holds. With federated
evaluation, ``evaluate.receive`` and ``evaluate`` bring the round's new global model to be scored on the
node's held-out share of its data (``eval.fraction``, split once with the run's seed, never trained on).

Runs inside the ClientApp process in simulation (whose actors live for the whole run) and inside the
node's persistent worker in deployment (deploy/worker.py), so the model is loaded once per process either
way. Weights between messages live on the node's disk (weights/node_state.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, RecordDict

from flowertune_llm.config import NodeConfig, NodeConfigError, RunConfig, run_config_of
from flowertune_llm.federated import protocol
from flowertune_llm.observe.profiling import Profiler
from flowertune_llm.training import data, models, sft
from flowertune_llm.weights.codec import encode_group
from flowertune_llm.weights.node_state import EVAL, TRAIN, NodeState, ReceivedGroups
from flowertune_llm.weights.transport import from_record, to_record

log = logging.getLogger(f"flwr.{__name__}")


@dataclass(frozen=True)
class NodeRound:
    """Who is answering: the run's config (parsed once per process and run) and this node's own."""

    run_id: int
    node_id: int
    run: RunConfig
    node: NodeConfig

    @classmethod
    def of(cls, context: Context, node: NodeConfig) -> NodeRound:
        return cls(context.run_id, context.node_id, run_config_of(context.run_id, context.run_config), node)


def handle(message_type: str, content: RecordDict, node_round: NodeRound, profile: Profiler) -> RecordDict:
    """Answer one message of a round (its type says which part); returns the reply's content."""
    if message_type == protocol.QUERY:  # the ClientApp answers this one itself, without this module's imports
        return protocol.QueryRes(node_round.node.name(node_round.node_id)).to_content()
    state = NodeState.open(node_round.run_id, node_round.node_id, node_round.node.state_dir)
    if message_type in (protocol.RECEIVE, protocol.EVALUATE_RECEIVE):
        ins = protocol.ReceiveIns.from_content(content)
        _store(ins.group, ins.header, state, TRAIN if message_type == protocol.RECEIVE else EVAL)
        return protocol.Ack().to_content()
    if message_type == protocol.SEND:
        return send(protocol.SendIns.from_content(content), node_round, state).to_content()
    if message_type == protocol.EVALUATE:
        return evaluate(protocol.EvaluateIns.from_content(content), node_round, state, profile).to_content()
    return train(protocol.TrainIns.from_content(content), node_round, state, profile).to_content()


def _store(group: protocol.Group, header: protocol.Header, state: NodeState, phase: str = TRAIN) -> None:
    """A group of the global model (``*.receive``, or the last one riding with ``train``/``evaluate``): its
    weights, its change from the model this node holds, or (the last group only) word that it holds it."""
    if group.held:
        state.receive_held(header.server_round, group.base_round, phase)
        return
    if group.index == 0:
        state.begin_round(header.server_round, phase)
    tensors = from_record(group.arrays)
    if group.change_format is not None:
        state.receive_change(header.server_round, group.index, group.count, tensors, group.manifest,
                             group.change_format, group.base_round, phase)  # fmt: skip
    else:
        state.receive(header.server_round, group.index, group.count, tensors, group.manifest, phase)


def _store_last(group: protocol.Group, header: protocol.Header, state: NodeState, config: RunConfig, phase: str) -> None:
    """The last group, and then (compressed updates) the whole global model kept: the next may come as a change."""
    _store(group, header, state, phase)
    if config.exchange.compressed and not group.held:
        model_round = header.server_round - 1 if phase == TRAIN else header.server_round
        state.hold(header.server_round, model_round, phase)


def _reply_arrays(keys: list[str], server_round: int, state: NodeState, config: RunConfig):
    """Group ``keys`` of this round's update: its weights, or (compressed) its change from the global model."""
    with state.source(server_round) as source:
        update = source.group(keys)
        if not config.exchange.compressed:
            return to_record(update), source.specs
        received = state.received(server_round)
        assert received is not None  # compressed updates are for adapters, which always come down
        with received:
            return to_record(encode_group(update, received.group(keys), config.exchange.update_format)), source.specs


def train(ins: protocol.TrainIns, node_round: NodeRound, state: NodeState, profile: Profiler) -> protocol.TrainRes:
    """``train``: take the global weights, train on this node's data, answer with the update's first group."""
    server_round, config = ins.header.server_round, node_round.run
    if ins.group is not None:
        _store_last(ins.group, ins.header, state, config, TRAIN)
    else:
        state.begin_round(server_round)
    received = state.received(server_round)

    if config.aggregation_only:
        weight, loss, step_seconds = _hold(node_round, state, server_round, received), None, None
    else:
        if received is None:
            raise ValueError(f"round {server_round}: the train message came without the global adapter")
        weight, loss, step_seconds = _train(node_round, state, server_round, received, ins, profile)

    with profile.span("adapter_out"):
        arrays, manifest = _reply_arrays(ins.reply_keys, server_round, state, config)
    return protocol.TrainRes(arrays, manifest, weight, loss, step_seconds)


def send(ins: protocol.SendIns, node_round: NodeRound, state: NodeState) -> protocol.SendRes:
    """``train.send``: one more group of this round's update."""
    arrays, _ = _reply_arrays(ins.keys, ins.header.server_round, state, node_round.run)
    return protocol.SendRes(arrays)


def _hold(node_round: NodeRound, state: NodeState, server_round: int, received: ReceivedGroups | None) -> float:
    """Aggregation-only: serve what the server sent, or else (a full model's first round) the node's own copy."""
    if received is not None:
        state.serve_from(server_round, received.directory)
    else:
        if not node_round.run.exchanges_full_weights:
            raise ValueError(f"round {server_round}: the train message came without the global adapter")
        state.serve_from(server_round, own_weights(node_round))
    return node_round.node.aggregation_weight


def own_weights(node_round: NodeRound) -> Path:
    """The node's copy of ``model.name`` (or of its ``model-path``) as local safetensors files."""
    path = node_round.node.model_path
    if path is not None:
        if not path.is_dir():
            raise NodeConfigError(f"node config model-path='{path}': no such directory")
        return path
    return models.local_weights(node_round.run.model.name)


def _train(
    node_round: NodeRound, state: NodeState, server_round: int, received: ReceivedGroups, ins: protocol.TrainIns,
    profile: Profiler,
) -> tuple[float, float, float]:  # fmt: skip
    config = node_round.run
    # Data first: a node whose data is missing fails in seconds, not after loading a model.
    with profile.span("data_load") as span:
        dataset, _ = _node_data(node_round)
        span["examples"] = len(dataset)
    model, tokenizer = _model_with(received, config, profile)
    with profile.span("train") as span:
        result = sft.train_round(model, tokenizer, dataset, config.train, config.model, learning_rate=ins.learning_rate,
                                 server_round=server_round, proximal_mu=ins.proximal_mu)  # fmt: skip
        span.update(
            steps=result.steps, tokens=result.tokens, padded_tokens=result.padded_tokens,
            tokenize_seconds=result.prepare_seconds,
            step_seconds=result.step_seconds,
            tokens_per_second=result.tokens / result.step_seconds if result.step_seconds else None,
            padded_tokens_per_second=result.padded_tokens / result.step_seconds if result.step_seconds else None,
        )  # fmt: skip
    rate = f", {result.tokens / result.step_seconds:,.0f} tokens/s" if result.step_seconds else ""
    log.info(
        "Round %d: train_loss %.4f over %d steps on %d examples (%d tokens, %d with padding%s; %.1f s)",
        server_round, result.train_loss, result.steps, result.num_examples, result.tokens, result.padded_tokens,
        rate, result.seconds,
    )  # fmt: skip
    state.serve_from(server_round, state.save_update(server_round, models.get_adapter_state(model)))
    return result.num_examples, result.train_loss, result.step_seconds


def _model_with(received: ReceivedGroups, config: RunConfig, profile: Profiler):
    """The process's cached model (loaded on first use), carrying the global adapter the server sent."""
    with profile.span("model_load") as span:
        model, tokenizer, span["cache_hit"] = models.cached_peft_model(config.model)
    with profile.span("adapter_in"), received:
        models.set_adapter_state(model, received.state())
    return model, tokenizer


def _node_data(node_round: NodeRound):
    """``(train, held out)``: the node's data, its held-out share taken out when the run evaluates (else None)."""
    config = node_round.run
    dataset = data.load_node_dataset(config.dataset, config.partition, config.train.seed, node_round.node)
    if not config.eval.every_round:
        return dataset, None
    return data.split_held_out(dataset, config.eval.fraction, config.train.seed)


def evaluate(ins: protocol.EvaluateIns, node_round: NodeRound, state: NodeState, profile: Profiler) -> protocol.EvaluateRes:
    """``evaluate``: the global model's completion loss on this node's held-out examples."""
    server_round, config = ins.header.server_round, node_round.run
    _store_last(ins.group, ins.header, state, config, EVAL)
    received = state.received(server_round, EVAL)
    with profile.span("data_load") as span:
        _, held_out = _node_data(node_round)
        if held_out is None:
            raise ValueError(f"round {server_round}: asked to evaluate, but eval.every-round is 0 in this run")
        span["examples"] = len(held_out)
    model, tokenizer = _model_with(received, config, profile)
    with profile.span("eval") as span:
        loss = sft.held_out_loss(model, tokenizer, held_out, config.train, config.model)
        span["examples"] = len(held_out)
    log.info("Round %d: eval_loss %.4f on %d held-out examples", server_round, loss, len(held_out))
    return protocol.EvaluateRes(loss, len(held_out))
