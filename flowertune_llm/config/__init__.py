"""What a run and a node are configured with: parsed once, validated, each error naming the key.

``run.py``: the run config (``[tool.flwr.app.config]`` + ``--run-config``) as frozen dataclasses;
``presets.py``: the defaults and the recipes under ``configs/``; ``node.py``: a SuperNode's ``--node-config``;
``errors.py``: the errors both raise.
"""

from flowertune_llm.config.errors import ConfigError, NodeConfigError
from flowertune_llm.config.node import NodeConfig
from flowertune_llm.config.presets import default_run_config, load_preset
from flowertune_llm.config.run import (
    DatasetConfig,
    ModelConfig,
    OutputConfig,
    PartitionConfig,
    RunConfig,
    TrainConfig,
    parse_run_config,
    run_config_of,
    to_flat_dict,
)

__all__ = [
    "ConfigError", "DatasetConfig", "ModelConfig", "NodeConfig", "NodeConfigError", "OutputConfig", "PartitionConfig",
    "RunConfig",
    "TrainConfig", "default_run_config", "load_preset", "parse_run_config", "run_config_of", "to_flat_dict",
]  # fmt: skip
