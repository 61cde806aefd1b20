"""Judging a fine-tune the way the FlowerTune leaderboard does: its datasets, prompts, decoding, answer
extraction and metrics, reproduced with their quirks (Flower ``benchmarks/flowertune-llm/evaluation/`` at
``fdef7afb``, the bigcode-evaluation-harness fork at ``3ff8ee00`` for code).

``benchmarks.py`` (the datasets and their examples) · ``prompts.py`` (the prompts, word for word) ·
``sources.py`` (Hub or ``--data-dir``) · ``generation.py`` (loading and decoding) · ``scoring.py``
(answer extraction, accuracy) · ``programs.py`` and ``sandbox.py`` + ``jail.py`` (running generated code)
· ``command.py`` (``flowertune-llm evaluate``).
"""
