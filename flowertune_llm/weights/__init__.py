"""Weights at rest and in flight, never all in memory: specs, messages, groups, checkpoints, the mean.

``tensors.py`` (specs, pieces, dtypes, safetensors headers) under both ``transport.py`` (one safetensors
payload per message), ``shards.py`` (checkpoints written piece by piece) and ``local_checkpoint.py``
(checkpoints read through mmap);
``groups.py`` (a model cut into messages within a byte budget); ``streaming.py`` (the weighted mean,
group by group, reply by reply); ``exchange.py`` (what a run exchanges: adapter or whole model);
``node_state.py`` (a node's weights between messages); ``disk.py`` (space checked before writing).
"""
