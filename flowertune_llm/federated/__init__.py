"""The federated round: the server's loop, the node's answers, and the messages between them.

``protocol.py`` (every message and its keys) · ``strategy.py`` (the server's round: sampling, phases,
the mean, checkpoint cadence) · ``messaging.py`` (Flower's Grid: push, collect, timeouts, bytes, the
in-flight window) · ``schedule.py`` (the learning rate of a round) · ``run_directory.py`` (what a run
writes) · ``client_round.py`` (a node's side of a round) · ``profile_mod.py`` (the client mod that
profiles a node's handling of a message when the server asks).
"""
