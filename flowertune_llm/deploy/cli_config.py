"""The ``flwr`` CLI's own configuration: connections in ``$FLWR_HOME/config.toml``, values on its command line."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowertune_llm.atomic import write_atomic


def toml_value(value: Any) -> str:
    """A TOML literal for a --node-config or --run-config value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    raise ValueError(f"cannot pass {text!r} on Flower's command line: it holds both kinds of quotes")


def node_config_arg(config: str | Mapping[str, Any]) -> str:
    """``--node-config`` text: a string as given, a mapping as ``key=value`` pairs."""
    if isinstance(config, str):
        return config
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def write_cli_connection(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None, make_default: bool = False
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``<flwr_home>/config.toml``, leaving the rest of the file as it is.

    A missing file starts as the one the ``flwr`` CLI would create (with its ``local`` connection).
    """
    path = Path(flwr_home) / "config.toml"
    if path.is_file():
        text = path.read_text()
    else:
        from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

        text = DEFAULT_FLOWER_CONFIG_TOML
    text = _without_connection(text, name)
    if make_default:
        text = _with_default(text, name)
    # JSON string escapes are valid TOML basic-string escapes.
    section = f"\n[superlink.{name}]\naddress = {json.dumps(address)}\n"
    section += (
        f"root-certificates = {json.dumps(str(root_certificates))}\n" if root_certificates else "insecure = true\n"
    )
    text += section
    tomllib.loads(text)  # never leave a file the CLI cannot read
    return write_atomic(path, text.encode())


def _without_connection(text: str, name: str) -> str:
    """``text`` without ``[superlink.<name>]`` (and its sub-tables such as ``[superlink.<name>.options]``)."""
    header = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")
    kept, skipping = [], False
    for line in text.splitlines():
        if match := header.match(line):
            table = match.group(1).replace('"', "")
            skipping = table == f"superlink.{name}" or table.startswith(f"superlink.{name}.")
        if not skipping:
            kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def _with_default(text: str, name: str) -> str:
    """``text`` with ``name`` as ``[superlink] default``, the rest of the file as it was."""
    if "default" in tomllib.loads(text).get("superlink", {}):
        return re.sub(r"(?m)^(\s*default\s*=\s*).*$", rf'\g<1>"{name}"', text, count=1)
    if "[superlink]" in text:
        return text.replace("[superlink]", f'[superlink]\ndefault = "{name}"', 1)
    return f'[superlink]\ndefault = "{name}"\n\n' + text


def default_connection(flwr_home: Path) -> str | None:
    path = Path(flwr_home) / "config.toml"
    return tomllib.loads(path.read_text()).get("superlink", {}).get("default") if path.is_file() else None


def remove_cli_connection(flwr_home: Path, name: str, default_before: str | None = None) -> None:
    """Take ``[superlink.<name>]`` out of ``<flwr_home>/config.toml`` again, leaving every other connection. If it
    had become the default, ``default_before`` (the default when it was written) is the default again, else
    Flower's ``local``."""
    path = Path(flwr_home) / "config.toml"
    if not path.is_file():
        return
    text = _without_connection(path.read_text(), name)
    connections = tomllib.loads(text).get("superlink", {})
    if connections.get("default") == name:
        text = _with_default(text, default_before if default_before in connections and default_before != name else "local")
    tomllib.loads(text)  # never leave a file the CLI cannot read
    write_atomic(path, text.encode())


def default_flwr_home() -> Path:
    """The ``FLWR_HOME`` the ``flwr`` CLI uses when none is given."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser().resolve()
