"""The server's round loop: the updates' weighted mean group by group (FedAvg, or a server optimizer's step on
it), with the schedule, the bill and the checkpoints.

Flower's ``FedAvg.start`` holds every reply before averaging, drops late replies without a word and has
no checkpoint hook, so the loop is written out here. One round, for the sampled nodes
(the messages are federated/protocol.py's; federated/messaging.py moves them):

1. **down**: groups ``1..G-1`` of the global model as ``train.receive``;
2. **train**: ``train`` with the learning rate and the last group; each node trains (or, in an
   aggregation-only run, does not) and answers with the first group of its update and its FedAvg weight;
3. **up**: ``train.send`` for groups ``2..G``;
4. **evaluate** (every ``eval.every-round`` rounds and after the last): the round's new global model goes
   down to the nodes whose updates made it (``evaluate.receive``, then ``evaluate`` with the last group),
   and each answers with its held-out loss; the weighted mean is the round's ``eval_loss``.

Group messages go ``aggregation.window`` ahead per node (group 1 down goes alone: it starts the node's
round, which later groups must not race in the Simulation Engine, where one node's queued messages can
run side by side). Replies are pulled by message id, group by group, so the ones ahead wait in the
SuperLink, not here.

Every reply is folded into a running weighted sum as it arrives (weights/streaming.py), each finished
group (with ``strategy.name`` a server optimizer: the step from the global model that its mean gives,
weights/server_optimizers.py, whose state goes into the checkpoint's ``server_optimizer/``) is written to
the round's checkpoint and freed, so the server holds one group's sum and the
replies in flight, never the model. ``all_at_once`` is the same loop with one group whose replies are
all held before averaging. The global model between rounds is the previous round's checkpoint on disk,
read back through mmap.

Nodes are sampled and folded in the order of their names (federated/roster.py), and every kept checkpoint
carries the sampler's state, so a run repeats bit for bit and a stopped one resumes exactly
(federated/resume.py).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid

from flowertune_llm.atomic import write_json
from flowertune_llm.config import RunConfig
from flowertune_llm.federated import protocol
from flowertune_llm.federated.downlink import Downlink, NodeCopies
from flowertune_llm.federated.history import History, RoundRecord
from flowertune_llm.federated.messaging import Messenger, Pending, TooFewNodes, Window, wait_for_nodes
from flowertune_llm.federated.resume import STATE_FILE, Resume, restore_sampler, sampler_state
from flowertune_llm.federated.roster import Roster
from flowertune_llm.federated.run_directory import RunDirectory
from flowertune_llm.federated.schedule import cosine_annealing
from flowertune_llm.observe.profiling import OFF, Profiler
from flowertune_llm.units import MiB
from flowertune_llm.weights.codec import ChangeRound, rebuild_group
from flowertune_llm.weights.disk import check_disk_space
from flowertune_llm.weights.exchange import Exchange
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.server_optimizers import OptimizerRound, ServerOptimizer, previous_state
from flowertune_llm.weights.shards import ShardedCheckpointWriter
from flowertune_llm.weights.streaming import TooFewClients, Update, spec_mismatch, streaming_fedavg
from flowertune_llm.weights.transport import from_record

log = logging.getLogger(f"flwr.{__name__}")  # a child of Flower's logger, so `flwr log` shows it

def server_optimizer(config: RunConfig) -> ServerOptimizer | None:
    """The server step ``strategy.name`` asks for, with its hyper-parameters; None for FedAvg and FedProx."""
    strategy = config.strategy
    if not strategy.has_server_optimizer:
        return None
    return ServerOptimizer(strategy.name, strategy.learning_rate, strategy.server_momentum, strategy.beta_1,
                           strategy.beta_2, strategy.tau)  # fmt: skip


def describe_strategy(config: RunConfig, exchange: Exchange) -> str:
    """One line for the run log: the strategy and the settings it uses."""
    strategy = config.strategy
    if strategy.name == "fedprox":
        return f"fedprox (proximal-mu {strategy.proximal_mu:g}: each node adds (mu/2)·||w - w_global||² to its loss)"
    optimizer = server_optimizer(config)
    if optimizer is None:
        return "fedavg (the weighted mean of the updates)"
    settings = {"fedavgm": f"momentum {optimizer.momentum:g}",
                "fedadam": f"beta-1 {optimizer.beta_1:g}, beta-2 {optimizer.beta_2:g}, tau {optimizer.tau:g}",
                "fedyogi": f"beta-1 {optimizer.beta_1:g}, beta-2 {optimizer.beta_2:g}, tau {optimizer.tau:g}",
                "fedadagrad": f"beta-1 {optimizer.beta_1:g}, tau {optimizer.tau:g}"}[optimizer.kind]  # fmt: skip
    state = optimizer.state_bytes(exchange.specs) / MiB
    return (f"{optimizer.kind} (server-learning-rate {optimizer.learning_rate:g}, {settings}; its state, "
            f"{state:.1f} MiB, is kept on disk with each checkpoint)")  # fmt: skip


class RoundFailed(RuntimeError):
    """Fewer usable updates than ``strategy.min-train-nodes``: the run stops rather than average too few."""


class StreamingStrategy:
    def __init__(self, config: RunConfig, run_dir: RunDirectory, exchange: Exchange, profile: Profiler = OFF,
                 resume: Resume | None = None, base: Path | None = None):  # fmt: skip
        """``base``: the model the nodes start from when the server sends none in round 1 (a full-model run);
        a server optimizer steps from it."""
        self.config = config
        self.run_dir = run_dir
        self.exchange = exchange
        self.profile = profile
        self.resume = resume
        self.history = resume.history if resume else History()
        self.roster = Roster()
        self._rng = random.Random(config.train.seed)
        if resume:
            restore_sampler(self._rng, resume.sampler)
        self.optimizer = server_optimizer(config)
        self.base = base
        self.copies = NodeCopies()  # with compressed updates: which global model each node holds

    @property
    def total_bytes(self) -> int:
        return self.history.total_bytes

    def run(self, grid: Grid, initial: Path | None) -> Path:
        """Run every round from the global model at ``initial`` (None: the nodes' own copies), or from where the
        resumed run stopped; return the last round's checkpoint."""
        current, first = (self.resume.checkpoint, self.resume.round + 1) if self.resume else (initial, 1)
        for server_round in range(first, self.config.num_server_rounds + 1):
            record = RoundRecord(server_round, self._learning_rate(server_round), groups=len(self.exchange.groups))
            self.history.append(record)
            self.profile.round = server_round
            with self.profile.span("round"):
                start = time.monotonic()
                try:
                    output, aggregated = self._round(grid, current, record)
                    if self.config.eval.due(server_round, self.config.num_server_rounds):
                        self._evaluate(grid, output, record, aggregated)
                finally:
                    record.seconds = time.monotonic() - start
                    with self.profile.span("history"):
                        self.run_dir.save_history(self.history.as_json())
            self.history.report(record, self.config.num_server_rounds)
            if self._kept(server_round):
                # Last, once the round's history is saved: a checkpoint with this file is one to resume from.
                write_json(output / STATE_FILE, {"round": server_round, "sampler": sampler_state(self._rng)})
            if current is not None and not self._kept(server_round - 1):
                shutil.rmtree(current)  # the previous global model, superseded and not a saved checkpoint
            current = output
            if self._kept(server_round):
                log.info("Saved the round-%d %s to %s", server_round, self.exchange.label, output)
            self.profile.memory("server")
        return current

    def _learning_rate(self, server_round: int) -> float:
        train = self.config.train
        return cosine_annealing(server_round, self.config.num_server_rounds, train.learning_rate_max, train.learning_rate_min)

    def _kept(self, server_round: int) -> bool:
        """Checkpoints of every ``save-every-round``-th round and of the last round stay; the others (and the
        initial round-0 adapter) are scratch."""
        return server_round > 0 and (
            server_round % self.config.train.save_every_round == 0 or server_round == self.config.num_server_rounds
        )

    # --- one round ---------------------------------------------------------------------------------------------

    def _round(self, grid: Grid, current: Path | None, record: RoundRecord) -> tuple[Path, list[int]]:
        """One round's sampling, exchanges and mean; returns its checkpoint and the nodes whose updates it holds."""
        messages = Messenger(grid, self.config.strategy.round_timeout, self.profile, record)
        target = self.run_dir.checkpoint_dir(record.round)
        with self.profile.span("configure"):
            # Before anything moves: a round whose output cannot be written is not started.
            state_bytes = self.optimizer.state_bytes(self.exchange.specs) if self.optimizer else 0
            check_disk_space(target.parent, self.exchange.layout.total_bytes + state_bytes,
                             what=f"the round-{record.round} checkpoint")  # fmt: skip
            nodes = self._sample(grid, messages, record)
            record.nodes = self.roster.names(nodes)

        reference = current if current is not None else self.base  # what a server optimizer steps from
        with ExitStack() as stack:
            global_model = stack.enter_context(LocalCheckpoint(current)) if current is not None else None
            if global_model is not None:
                downlink = stack.enter_context(self._downlink(global_model, record.round - 1))
                nodes = self._send_down(messages, downlink, record, nodes, protocol.RECEIVE, record.failures)
                trained = self._push_last(messages, protocol.TRAIN, downlink, nodes,
                                          lambda group: self._train_ins(group, record))  # fmt: skip
            else:
                trained = messages.push(protocol.TRAIN, self._train_ins(None, record), nodes)
            stages: list[RoundStage] = []
            if self.optimizer is not None:
                if reference is None:
                    raise RoundFailed(f"round {record.round}: strategy.name={self.config.strategy.name} needs the "
                                      "global model before the round on the server, and there is none")  # fmt: skip
                before = stack.enter_context(LocalCheckpoint(reference)) if reference != current else global_model
                state = previous_state(current)
                stages.append(OptimizerRound(self.optimizer, record.round, self.exchange.specs, before,
                                             stack.enter_context(LocalCheckpoint(state)) if state else None))  # fmt: skip
            if self.config.exchange.compressed:
                assert global_model is not None  # compression is refused for full-model runs, the only ones without
                stages.append(ChangeRound(self.config.exchange.update_format, self.exchange.specs, global_model))
            apply = partial(_apply_in_turn, stages) if stages else None

            losses: dict[int, float] = {}
            uploads = _Uploads(self, messages, record, trained, losses, global_model)
            try:
                result = streaming_fedavg(
                    self.exchange.specs, self.exchange.groups, nodes, uploads, lambda: self._output(target, stages),
                    min_clients=self.config.strategy.min_train_nodes, span=self.profile.span, apply=apply,
                )  # fmt: skip
            except TooFewClients as failure:
                for node, reason in failure.left_out.items():
                    record.leave_out(self.roster.name(node), reason)
                raise RoundFailed(
                    f"round {record.round}: {failure.usable} usable update(s), fewer than strategy.min-train-nodes="
                    f"{self.config.strategy.min_train_nodes}; left out: {record.failures or 'none'}"
                ) from None
        for node, reason in result.left_out.items():
            record.leave_out(self.roster.name(node), reason)
        record.aggregated, record.restarts = self.roster.names(result.aggregated), result.restarts
        for name in record.failures:
            self.copies.forget(name)
        for name in record.aggregated:
            self.copies.holds(name, record.round - 1)  # the global model it trained from
        if losses:
            total = sum(result.weights.values())
            record.train_loss = sum(losses[n] * result.weights[n] for n in result.aggregated) / total
        return target, result.aggregated

    def _sample(self, grid: Grid, messages: Messenger, record: RoundRecord) -> list[int]:
        """``fraction-train`` of the connected nodes, at least ``min-train-nodes``, waiting for that many to
        connect; drawn from, and returned in, the order of their names."""
        strategy = self.config.strategy
        try:
            node_ids = wait_for_nodes(grid, strategy.min_train_nodes, strategy.round_timeout, log)
        except TooFewNodes as error:
            raise RoundFailed(f"{error}; strategy.min-train-nodes={strategy.min_train_nodes}") from None
        self.roster.learn(messages, node_ids, self.header(record))
        ordered = self.roster.ordered(node_ids)
        size = min(len(ordered), max(int(len(ordered) * strategy.fraction_train), strategy.min_train_nodes))
        return self.roster.ordered(self._rng.sample(ordered, size))

    def _downlink(self, model: LocalCheckpoint, model_round: int) -> Downlink:
        return Downlink(self.exchange, self.config.exchange.update_format, model, model_round, self.copies, self.profile)

    def _send_down(self, messages: Messenger, downlink: Downlink, record: RoundRecord, nodes: list[int],
                   message_type: str, failures: dict[str, str]) -> list[int]:  # fmt: skip
        """Groups ``1..G-1`` down, to each node as it is to get them (weights or a change; nothing to a node
        that holds the model); returns the nodes that stored them all (the last group goes with the ``train``
        or ``evaluate`` message that follows). A node that fails is named in ``failures``."""
        nodes, last = list(nodes), len(self.exchange.groups) - 1
        cohorts = downlink.cohorts(nodes, self.roster.names(nodes))
        sent = {encoding: members for encoding, members in cohorts.items() if not encoding.startswith(protocol.HELD)}

        def push(index: int) -> Pending:
            pending: Pending = {}
            for encoding, members in sent.items():
                members = [n for n in members if self.roster.name(n) not in failures]
                ins = protocol.ReceiveIns(self.header(record), downlink.group(index, encoding))
                pending.update(messages.push(message_type, ins.to_content(), members))
            return pending

        window = Window(self.config.aggregation.window, count=last)
        for index in range(last):
            # Group 1 goes alone: it starts the node's round. Later ones go a window ahead.
            pending = push(index) if index == 0 else window.take(index, push)
            pending = {message: node for message, node in pending.items() if self.roster.name(node) not in failures}
            for update in messages.collect(pending, lambda content, node: Update(node)):
                if update.problem:
                    record.leave_out(self.roster.name(update.client), f"group {index + 1} down: {update.problem}", failures)
        for name in failures:
            self.copies.forget(name)
        return [n for n in nodes if self.roster.name(n) not in failures]

    def _push_last(self, messages: Messenger, message_type: str, downlink: Downlink, nodes: list[int],
                   content: Callable[[protocol.Group], RecordDict]) -> Pending:  # fmt: skip
        """The ``train`` or ``evaluate`` message with the last group, to each node as it is to get it."""
        pending: Pending = {}
        last = len(self.exchange.groups) - 1
        for encoding, members in downlink.cohorts(nodes, self.roster.names(nodes)).items():
            pending.update(messages.push(message_type, content(downlink.group(last, encoding)), members))
        return pending

    def _evaluate(self, grid: Grid, model: Path, record: RoundRecord, aggregated: list[int]) -> None:
        """The round's new global model, sent to the nodes whose updates made it, scored on their held-out data."""
        messages = Messenger(grid, self.config.strategy.round_timeout, self.profile, record)
        with self.profile.span("evaluate"), LocalCheckpoint(model) as global_model, \
                self._downlink(global_model, record.round) as downlink:  # fmt: skip
            nodes = self._send_down(messages, downlink, record, aggregated, protocol.EVALUATE_RECEIVE,
                                    record.eval_failures)  # fmt: skip
            pending = self._push_last(messages, protocol.EVALUATE, downlink, nodes,
                                      lambda group: protocol.EvaluateIns(self.header(record), group).to_content())  # fmt: skip
            losses: dict[int, float] = {}
            for update in messages.collect(pending, lambda content, node: self._decode_eval(content, node, losses)):
                if update.problem:
                    record.leave_out(self.roster.name(update.client), f"evaluate: {update.problem}", record.eval_failures)
                else:
                    record.eval_examples += int(update.weight)
        record.eval_nodes = self.roster.names(self.roster.ordered(losses))
        for name in record.eval_failures:
            self.copies.forget(name)
        for name in record.eval_nodes:
            self.copies.holds(name, record.round)  # the model it evaluated
        if record.eval_examples:
            record.eval_loss = math.fsum(losses[n] for n in self.roster.ordered(losses)) / record.eval_examples
            log.info("[round %d/%d] eval_loss %.4f on %d held-out examples of %d node(s)", record.round,
                     self.config.num_server_rounds, record.eval_loss, record.eval_examples, len(record.eval_nodes))  # fmt: skip
        else:
            log.warning("Round %d: no node evaluated the global model: %s", record.round, record.eval_failures or "none asked")

    def _train_ins(self, group: protocol.Group | None, record: RoundRecord) -> RecordDict:
        strategy = self.config.strategy
        mu = strategy.proximal_mu if strategy.name == "fedprox" else 0.0
        ins = protocol.TrainIns(self.header(record), record.learning_rate, self.exchange.group_keys(0), group, mu)
        return ins.to_content()

    def header(self, record: RoundRecord) -> protocol.Header:
        return protocol.Header(record.round, self.profile.enabled)

    @contextmanager
    def _output(self, target: Path, stages: Sequence[RoundStage]) -> Iterator[ShardedCheckpointWriter]:
        """The round's checkpoint writer, and what its stages write inside it (a server optimizer's state, the
        change sent to nodes): all committed at the end, all dropped when the round restarts or fails."""
        writer = self.exchange.writer(target)
        with self.profile.span("checkpoint", step="open"):
            writer.open()
            for stage in stages:
                stage.open_inside(writer)
        try:
            yield writer
        except BaseException:
            for stage in stages:
                stage.abort()
            writer.abort()
            raise
        with self.profile.span("checkpoint", step="commit"):
            for stage in stages:
                stage.commit()
            writer.commit()

    # --- replies -----------------------------------------------------------------------------------------------

    def decode_train(self, content: RecordDict, node: int, losses: dict[int, float], unpack: Unpack) -> Update[int]:
        try:
            reply = protocol.TrainRes.from_content(content)
        except protocol.ProtocolError as error:
            return Update(node, problem=str(error))
        mismatch = spec_mismatch(self.exchange.specs, reply.manifest)
        if mismatch:
            return Update(node, problem=f"holds weights unlike the global model's: {mismatch}")
        if not self.config.aggregation_only:
            loss = reply.train_loss if reply.train_loss is not None else math.nan
            if not math.isfinite(loss):
                return Update(node, problem=f"update rejected: train_loss={loss}")
            losses[node] = loss
        return _unpacked(node, reply.arrays, unpack, weight=reply.weight)

    def unpacker(self, global_model: LocalCheckpoint | None, index: int) -> Unpack:
        """How group ``index`` of an update is read: the weights as sent, or (compressed updates) the global
        model's group changed by what was sent (weights/codec.py)."""
        if not self.config.exchange.compressed:
            return from_record
        assert global_model is not None
        pieces, update_format = self.exchange.groups[index], self.config.exchange.update_format
        return lambda arrays: rebuild_group(from_record(arrays), global_model.group(pieces), update_format)

    @staticmethod
    def _decode_eval(content: RecordDict, node: int, losses: dict[int, float]) -> Update[int]:
        try:
            reply = protocol.EvaluateRes.from_content(content)
        except protocol.ProtocolError as error:
            return Update(node, problem=str(error))
        if not math.isfinite(reply.loss) or reply.examples < 1:
            return Update(node, problem=f"eval_loss={reply.loss} over {reply.examples} examples")
        losses[node] = reply.loss * reply.examples  # summed, divided by all examples once every node is in
        return Update(node, weight=reply.examples)

    @staticmethod
    def decode_group(content: RecordDict, node: int, unpack: Unpack) -> Update[int]:
        try:
            arrays = protocol.SendRes.from_content(content).arrays
        except protocol.ProtocolError as error:
            return Update(node, problem=str(error))
        return _unpacked(node, arrays, unpack)


Unpack = Callable[[ArrayRecord], Mapping[str, torch.Tensor]]
RoundStage = OptimizerRound | ChangeRound  # what a round applies to each group's mean, in turn


def _unpacked(node: int, arrays: ArrayRecord, unpack: Unpack, weight: float = 0.0) -> Update[int]:
    try:
        return Update(node, unpack(arrays), weight=weight)
    except ValueError as error:  # a payload or a change that does not decode: named, the node left out
        return Update(node, problem=str(error))


def _apply_in_turn(stages: Sequence[RoundStage], key: str, values: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        values = stage(key, values)
    return values


class _Uploads:
    """Each group's replies for :func:`streaming_fedavg`: the train replies for group 1, ``train.send`` after.

    ``train.send`` for the next ``aggregation.window`` groups goes out once the train replies are in (never
    alongside the train message: in the Simulation Engine it could overtake it). A restart without a node
    changes who is asked, so what was asked ahead of the old set is dropped.
    """

    def __init__(self, strategy: StreamingStrategy, messages: Messenger, record: RoundRecord, trained: Pending,
                 losses: dict[int, float], global_model: LocalCheckpoint | None):  # fmt: skip
        self.strategy, self.messages, self.record, self.losses = strategy, messages, record, losses
        self.global_model = global_model
        self.trained: Pending | None = trained
        self.asked_of: list[int] = []
        self.window = Window(0, 0)

    def __call__(self, clients: Sequence[int], index: int) -> Iterable[Update[int]]:
        config, exchange = self.strategy.config, self.strategy.exchange
        unpack = self.strategy.unpacker(self.global_model, index)
        if index == 0 and self.trained is not None:
            trained, self.trained = self.trained, None
            replies = self.messages.collect(trained, lambda c, node: self.strategy.decode_train(c, node, self.losses, unpack))
        else:
            if list(clients) != self.asked_of:
                self.asked_of = list(clients)
                self.window = Window(config.aggregation.window, count=len(exchange.groups))

            def push(ahead: int) -> Pending:
                ins = protocol.SendIns(self.strategy.header(self.record), exchange.group_keys(ahead))
                return self.messages.push(protocol.SEND, ins.to_content(), clients)

            replies = self.messages.collect(self.window.take(index, push),
                                            lambda c, node: self.strategy.decode_group(c, node, unpack))  # fmt: skip
        # all_at_once holds every reply before averaging; layerwise folds each as it arrives.
        return replies if config.aggregation.mode == "layerwise" else list(replies)
