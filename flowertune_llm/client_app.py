"""ClientApp: one round of local instruction tuning of the global adapter on this node's data.

In simulation the round runs in this process (an actor that lives for the whole run, so the model stays
loaded). In deployment Flower starts a new process per message, so the round goes to the node's
persistent worker instead, and this module imports nothing heavy (no torch) to stay quick to start.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flowertune_llm import profiling, worker

app = ClientApp(mods=[profiling.profiling_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    profile = profiling.current()  # a no-op unless profile.enabled
    if worker.wanted(context.node_config):
        content = worker.run_round(msg.content, context, profile)
    else:
        from flowertune_llm import client_round

        content = client_round.train(msg.content, context.run_config, context.node_config, profile)
    return Message(content, reply_to=msg)
