"""The two ways a configuration can be wrong, each naming the key at fault."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A run-config value that cannot work; the message names the key."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"run config `{key}` = {value!r}: {problem}")

    def __reduce__(self):  # rebuilt intact in another process (Ray actors, process pools)
        return type(self), (self.key, self.value, self.problem)


class NodeConfigError(ValueError):
    """A SuperNode's ``--node-config`` cannot work; the message names the key and, for files, the path."""
