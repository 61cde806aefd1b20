"""Where run configs come from: the app's defaults in ``pyproject.toml`` and the recipes in ``configs/``.

Flower merges ``--run-config`` into the defaults before the app sees them and refuses a TOML file next to
key=value pairs, so ``preset='<name>'`` is how a user takes a recipe and changes one key on top of it:
defaults < preset < what the user set.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowertune_llm.config.errors import ConfigError

log = logging.getLogger(f"flwr.{__name__}")  # a child of Flower's logger, so `flwr log` shows it

APP_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = APP_ROOT / "configs"


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def default_run_config() -> dict[str, Any]:
    """The app's defaults, flat, exactly as Flower reads them from ``pyproject.toml``."""
    with (APP_ROOT / "pyproject.toml").open("rb") as f:
        return _flatten(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def load_preset(name: str) -> dict[str, Any]:
    """Flat keys of a preset TOML: a name under ``configs/`` (with or without ``.toml``), else a file path.

    Names are looked up in ``configs/`` first: Flower runs the apps in the SuperLink's working directory,
    where a stray file must not shadow a recipe.
    """
    candidates = [PRESETS_DIR / f"{name}.toml", PRESETS_DIR / name, Path(name).expanduser()]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        available = sorted(str(p.relative_to(PRESETS_DIR).with_suffix("")) for p in PRESETS_DIR.rglob("*.toml"))
        raise ConfigError("preset", name, f"no such preset; available: {', '.join(available)}")
    try:
        with path.open("rb") as f:
            return _flatten(tomllib.load(f))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("preset", name, f"{path} is not valid TOML: {error}") from None


def resolve_preset(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Layer ``defaults < preset < explicit overrides``.

    Flower merges ``--run-config`` into the defaults before the app sees them and refuses a TOML file
    next to key=value pairs, so ``preset='<name>'`` is how a user takes a recipe and changes one key.
    A key whose value differs from its default counts as set by the user and wins over the preset;
    a key set back to exactly its default cannot be told apart from one never set, so the preset wins there.
    """
    flat = dict(flat)
    preset_name = flat.get("preset", "")
    if not preset_name:
        return flat
    defaults = default_run_config()
    preset = load_preset(preset_name)
    unknown = sorted(set(preset) - set(defaults))
    if unknown:
        raise ConfigError(unknown[0], preset[unknown[0]], f"unknown key in preset '{preset_name}'")
    kept = []
    for key, value in preset.items():
        if key == "preset":
            continue
        if key not in flat or flat[key] == defaults.get(key):
            flat[key] = value
        elif flat[key] != value:
            kept.append(f"{key}={flat[key]!r}")
    message = f"Preset '{preset_name}' sets {len(preset)} keys" + (
        f"; overridden on the command line: {', '.join(kept)}" if kept else ""
    )
    log.info(message)
    return flat
