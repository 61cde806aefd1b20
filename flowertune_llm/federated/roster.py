"""The nodes of a run, by names that do not change from one run to the next.

Flower names a node by a random 64-bit id, new for every simulated node in every run. A run that sampled,
folded and recorded nodes by those ids could not be repeated bit for bit: the same partitions would come in
another order, and floating-point sums depend on order. So each node is asked once for its name
(a ``query`` message; federated/protocol.py): ``partition-<i>`` for a node training on partition ``i`` (every
simulated node, and SuperNodes started with ``partition-id``), else ``node-<id>`` (a SuperNode with its own
data keeps its id across runs of the same SuperLink). Nodes are sampled and folded in name order, and
history.json names them so.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flowertune_llm.federated import protocol
from flowertune_llm.federated.messaging import Messenger
from flowertune_llm.weights.streaming import Update


class Roster:
    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def learn(self, messages: Messenger, node_ids: Iterable[int], header: protocol.Header) -> None:
        """Ask the nodes not yet named for their names; one that cannot answer is named by its id."""
        unknown = [node for node in node_ids if node not in self._names]
        if not unknown:
            return
        pending = messages.push(protocol.QUERY, protocol.QueryIns(header).to_content(), unknown)
        for update in messages.collect(pending, self._decode):
            if update.problem:
                self._names[update.client] = f"node-{update.client}"

    def _decode(self, content, node: int) -> Update[int]:
        try:
            self._names[node] = protocol.QueryRes.from_content(content).name
        except protocol.ProtocolError as error:
            return Update(node, problem=str(error))
        return Update(node)

    def name(self, node: int) -> str:
        return self._names.get(node, f"node-{node}")

    def names(self, nodes: Sequence[int]) -> list[str]:
        return [self.name(node) for node in nodes]

    def ordered(self, nodes: Iterable[int]) -> list[int]:
        """``nodes`` in name order (ties, two nodes claiming one partition, broken by id)."""
        return sorted(nodes, key=lambda node: (self.name(node), node))
