"""A node's local work: the base model and its adapter, the data and its prompts, one round of SFT.

``models.py`` (loading, quantization, the per-process cache, adapter state) · ``data.py`` (partitions,
local files, one formatter per challenge) · ``partitions.py`` (flwr-datasets' IID and non-IID partitioners,
derived labels, the empty-node check) · ``templates.py`` (prompts) · ``sft.py`` (one round of TRL
SFT at the server's learning rate) · ``inference.py`` (answering with a trained adapter).
"""
