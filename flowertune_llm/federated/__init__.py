"""The federated round: the server's loop, the node's answers, and the messages between them.

``protocol.py`` (every message and its keys) · ``start.py`` (a run's config checked and recorded, its initial
global model, or where a resumed run goes on) · ``strategy.py`` (the server's round: sampling, phases, the
mean, checkpoint cadence) · ``messaging.py`` (Flower's Grid: push, collect, timeouts, bytes, the in-flight
window) · ``roster.py`` (nodes by names that do not change between runs) · ``history.py`` (the round record,
the log line, the budget) · ``resume.py`` (continuing a stopped run exactly) · ``schedule.py`` (the learning
rate of a round) · ``run_directory.py`` (what a run writes) · ``client_round.py`` (a node's side of a round)
· ``profile_mod.py`` (the client mod that profiles a node's handling of a message when the server asks).
"""
