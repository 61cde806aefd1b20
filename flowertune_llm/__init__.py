"""Federated instruction tuning of LLMs with LoRA/DoRA adapters on Flower.

The packages, lowest first (each imports only from those before it):

    config/       what a run and a node are configured with, parsed once, errors naming the key
    weights/      specs, messages, groups, checkpoints, the streaming mean: weights never all in memory
    training/     the base model and adapter, data and prompts, one round of SFT, inference
    observe/      profiling (spans, memory, bytes) and its reports
    federated/    the message protocol, the server's round loop, the node's answers
    deploy/       the Deployment Engine: certificates and keys, a local federation, the node's worker

``client_app.py`` and ``server_app.py`` wire Flower to ``federated/``; ``cli.py`` is the
``flowertune-llm`` command; ``atomic.py`` writes files whole or not at all; ``units.py`` says what a
megabyte is (MiB); ``builtin/`` holds the offline models and instruction set. See ARCHITECTURE.md.
"""
