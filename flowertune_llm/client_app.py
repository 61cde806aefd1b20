"""ClientApp: one round of local instruction tuning of the global adapter on this node's data, its weights
moving group by group (``train.receive`` down, ``train``, ``train.send`` up; ``evaluate.receive`` and
``evaluate`` for federated evaluation; see federated/protocol.py).

In simulation the round runs in this process (an actor that lives for the whole run, so the model stays
loaded). In deployment Flower starts a new process per message, so the round goes to the node's
persistent worker instead, and this module imports nothing heavy (no torch) to stay quick to start.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flowertune_llm.config import NodeConfig
from flowertune_llm.deploy import worker
from flowertune_llm.federated import profile_mod, protocol

app = ClientApp(mods=[profile_mod.profiling_mod])


def _answer(msg: Message, context: Context) -> Message:
    node = NodeConfig.parse(context.node_config)
    profile = profile_mod.current()  # a no-op unless the server asked for a profile
    if worker.wanted(node):
        content = worker.handle(msg.metadata.message_type, msg.content, context, node, profile)
    else:
        from flowertune_llm.federated import client_round

        node_round = client_round.NodeRound.of(context, node)
        content = client_round.handle(msg.metadata.message_type, msg.content, node_round, profile)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Take the global weights, train, answer with the first group of the update."""
    return _answer(msg, context)


@app.train("receive")
def receive(msg: Message, context: Context) -> Message:
    """Store one group of the global model (layer-wise rounds send all but the last this way)."""
    return _answer(msg, context)


@app.train("send")
def send(msg: Message, context: Context) -> Message:
    """Answer with one more group of this round's update."""
    return _answer(msg, context)


@app.evaluate("receive")
def evaluate_receive(msg: Message, context: Context) -> Message:
    """Store one group of the round's new global model, to be evaluated."""
    return _answer(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Take the last group and answer with the global model's loss on this node's held-out examples."""
    return _answer(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The node's name across runs (its partition, else its node id), asked once per run: no worker needed."""
    name = NodeConfig.parse(context.node_config).name(context.node_id)
    return Message(protocol.QueryRes(name).to_content(), reply_to=msg)
