"""Seeing where a run's seconds, bytes and memory go.

``profiling.py`` (the recorder: spans, memory, messages; federated/profile_mod.py runs it around a node's
handler) · ``report.py`` (reading ``profile.jsonl``: tables and a timeline plot).
"""
