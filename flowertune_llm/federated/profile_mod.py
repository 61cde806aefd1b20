"""The Flower client mod that profiles a node's handling of a message, when the message asks for it.

The server sets the profile flag in every instruction's header (federated/protocol.py), so the mod needs
no run config. It records the handler in a :class:`~flowertune_llm.observe.profiling.Recorder` that the
round's code finds with :func:`current`, and returns the events in the reply.
"""

from __future__ import annotations

import contextvars
import os

from flwr.app import Context, Message

from flowertune_llm.federated import protocol
from flowertune_llm.observe.profiling import OFF, Profiler, Recorder, reset_gpu_peak

_current: contextvars.ContextVar[Profiler] = contextvars.ContextVar("flowertune_llm_profile", default=OFF)


def current() -> Profiler:
    """The recorder of the message being handled on this node (OFF outside the mod, or when not profiling)."""
    return _current.get()


def profiling_mod(msg: Message, context: Context, call_next) -> Message:
    """Record the handler when the message's header asks for it; the events travel back in the reply."""
    header = protocol.Header.from_content(msg.content)
    if not header.profile:
        return call_next(msg, context)
    recorder = Recorder(node=context.node_id)
    recorder.round = header.server_round
    reset_gpu_peak()  # a per-round GPU peak, not the process's lifetime peak
    token = _current.set(recorder)
    try:
        with recorder.span("handler", pid=os.getpid()):
            reply = call_next(msg, context)
    finally:
        _current.reset(token)
    recorder.memory("clientapp")  # in deployment a short-lived process; the node's worker reports its own
    if not reply.has_error():
        protocol.attach_events(reply.content, recorder.events)
    return reply
