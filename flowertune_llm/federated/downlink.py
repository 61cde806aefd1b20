"""What goes down to each node: the global model, its change from the model the node holds, or nothing.

With ``exchange.update-format=float32`` every node gets the global model's weights. With ``bfloat16`` or
``int8`` (weights/codec.py) the server remembers which global model each node holds (:class:`NodeCopies`:
the one it last received whole, by round) and sends

* nothing but an empty last group (``held:<r>``) to a node that holds this very model (it evaluated it);
* the change stored with this model (``global_change/``, from the model one round older) to a node that
  holds that older model: what it rebuilds is this model, bit for bit;
* the weights to anyone else: a node that sat out a round, joined late, failed, or any node in round 1
  and in the first round of a resumed run (nodes keep no copies across runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flowertune_llm.federated import protocol
from flowertune_llm.observe.profiling import Profiler
from flowertune_llm.weights.codec import CHANGE_DIR, stored_change
from flowertune_llm.weights.exchange import Exchange
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.transport import to_record

WEIGHTS = ""  # the encoding of a group of weights


class NodeCopies:
    """The global model each node holds, by the round that made it (0: the initial one), as the server saw it
    arrive; a node whose exchange failed is forgotten (it gets the weights next time)."""

    def __init__(self) -> None:
        self._rounds: dict[str, int] = {}

    def holds(self, name: str, model_round: int) -> None:
        self._rounds[name] = model_round

    def forget(self, name: str) -> None:
        self._rounds.pop(name, None)

    def round_of(self, name: str) -> int | None:
        return self._rounds.get(name)


class Downlink:
    """The groups of global model ``model`` (made by round ``model_round``) as each node is to receive them."""

    def __init__(self, exchange: Exchange, update_format: str, model: LocalCheckpoint, model_round: int,
                 copies: NodeCopies, profile: Profiler):  # fmt: skip
        self.exchange, self.update_format, self.model, self.model_round = exchange, update_format, model, model_round
        self.copies, self.profile = copies, profile
        change = Path(model.path) / CHANGE_DIR
        self._change = LocalCheckpoint(change) if update_format != "float32" and change.is_dir() else None

    def __enter__(self) -> Downlink:
        if self._change is not None:
            self._change.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._change is not None:
            self._change.__exit__(*exc)

    def encoding(self, name: str) -> str:
        """What node ``name`` gets: the weights, a change (``<format>:<r>``), or nothing (``held:<r>``)."""
        held = self.copies.round_of(name)
        if self.update_format == "float32" or held is None:
            return WEIGHTS
        if held == self.model_round:
            return protocol.held_encoding(held)
        if held == self.model_round - 1 and self._change is not None:
            return protocol.change_encoding(self.update_format, held)
        return WEIGHTS

    def cohorts(self, nodes: Sequence[int], names: Sequence[str]) -> dict[str, list[int]]:
        """``nodes`` (named ``names``) by what they get, each cohort in the given order."""
        cohorts: dict[str, list[int]] = {}
        for node, name in zip(nodes, names, strict=True):
            cohorts.setdefault(self.encoding(name), []).append(node)
        return cohorts

    def group(self, index: int, encoding: str) -> protocol.Group:
        # The first group carries every tensor's shape: the node must know when it has the whole model.
        count = len(self.exchange.groups)
        manifest = self.exchange.specs if index == 0 else None
        if encoding.startswith(protocol.HELD + ":"):
            return protocol.Group(index, count, to_record({}), manifest, encoding)
        pieces = self.exchange.groups[index]
        with self.profile.span("configure", group=index):
            if encoding == WEIGHTS:
                tensors = self.model.group(pieces)
            else:
                assert self._change is not None
                tensors = stored_change(self._change, pieces, self.exchange.specs, self.update_format)
            arrays = to_record(tensors)
        return protocol.Group(index, count, arrays, manifest, encoding)
