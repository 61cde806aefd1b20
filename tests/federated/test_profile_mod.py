"""The client mod profiles a node's handling of a message when, and only when, the message asks for it."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from flowertune_llm.federated import profile_mod, protocol
from testbed.grids import error_reply

CONTEXT = Context(run_id=1, node_id=12, node_config={}, state=RecordDict(), run_config={})


def message(profile: bool) -> Message:
    content = protocol.SendIns(protocol.Header(4, profile=profile), ["w"]).to_content()
    return Message(content, dst_node_id=12, message_type=protocol.SEND)


def handler(msg: Message, context: Context) -> Message:
    with profile_mod.current().span("adapter_out"):
        pass
    return Message(protocol.Ack().to_content(), reply_to=msg)


def test_a_profiled_message_brings_the_nodes_spans_back_in_the_reply():
    reply = profile_mod.profiling_mod(message(profile=True), CONTEXT, handler)
    events = protocol.events_of(reply.content)
    spans = {e["name"]: e for e in events if e["kind"] == "span"}
    assert spans["adapter_out"]["parent"] == "handler" and spans["handler"]["pid"] > 0
    assert {e["node"] for e in events} == {12} and {e["round"] for e in events} == {4}
    assert [e for e in events if e["kind"] == "memory"][0]["peak_rss_mb"] > 0


def test_an_unprofiled_message_costs_nothing_and_carries_nothing():
    seen = []
    reply = profile_mod.profiling_mod(message(profile=False), CONTEXT, lambda m, c: seen.append(profile_mod.current()) or handler(m, c))
    assert protocol.events_of(reply.content) == [] and not seen[0].enabled
    assert not profile_mod.current().enabled  # nothing leaks to the next message


def test_an_error_reply_passes_through_untouched():
    reply = profile_mod.profiling_mod(message(profile=True), CONTEXT, lambda m, c: error_reply(m, "boom"))
    assert reply.has_error() and reply.error.reason == "boom"
