"""Continuing a stopped or crashed run from its last kept checkpoint, exactly as if it had never stopped.

``--run-config "resume-from='<run directory or run id>'"``. What makes the continuation exact:

* the global model after round K is the kept checkpoint ``checkpoints/round-K`` itself;
* the learning rate of a round depends on the round number only (federated/schedule.py);
* a server optimizer's state after round K is saved inside that checkpoint (``server_optimizer/``);
* the node sampler's random state after round K is saved inside that checkpoint (:data:`STATE_FILE`),
  written last, once the round's history is saved: a checkpoint without it (the process died in between)
  is not resumed from, the kept one before it is;
* nodes are sampled and folded by their names (federated/roster.py), not by Flower's ids, which the
  Simulation Engine draws anew in every run;
* the nodes' own randomness is seeded per round (``train.seed + round``), their data split and partitions
  by ``train.seed``.

The new run directory gets the earlier rounds' history (so its communication total goes on from theirs), the
round-K checkpoint (hard-linked, or copied across filesystems), and ``resumed_from.json`` saying where it
came from. A config that could not continue the run is refused naming the key; the keys that change how,
not what, a run computes may differ (:data:`MAY_DIFFER`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowertune_llm.atomic import write_json
from flowertune_llm.config import ConfigError
from flowertune_llm.federated.history import History, RoundRecord

STATE_FILE = "flowertune_state.json"  # beside the weights of every kept checkpoint
RESUMED_FROM = "resumed_from.json"
# Operational settings: they change where outputs go, what is recorded and how messages are cut, never a bit.
MAY_DIFFER = frozenset({
    "resume-from", "preset", "output.dir", "profile.enabled", "strategy.round-timeout", "aggregation.window",
    "aggregation.max-message-mb",
})  # fmt: skip


def sampler_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def restore_sampler(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


@dataclass(frozen=True)
class Resume:
    """Where a resumed run starts: after ``round``, from ``checkpoint``, with the history and sampler state."""

    source: Path  # the run directory resumed
    round: int
    checkpoint: Path  # in the new run directory
    history: History
    sampler: list


def locate(value: str, output_root: Path) -> Path:
    """A run directory given by path, or by run id under ``output.dir``."""
    candidates = [Path(value).expanduser(), output_root / value]
    for candidate in candidates:
        if (candidate / "run_config.json").is_file():
            return candidate.resolve()
    raise ConfigError("resume-from", value, f"no run directory there or under {output_root} (a run directory holds run_config.json)")


def check_compatible(previous: Mapping[str, Any], current: Mapping[str, Any], source: Path) -> None:
    """Refuse, naming the first key, a config that would not compute what the stopped run computed."""
    for key in sorted(set(previous) | set(current)):
        if key in MAY_DIFFER:
            continue
        if previous.get(key) != current.get(key):
            raise ConfigError(key, current.get(key), f"the run resumed ({source}) had {previous.get(key)!r}; "
                              "a resumed run must keep it")  # fmt: skip


def last_kept_round(source: Path, num_rounds: int) -> int:
    """The last round whose checkpoint and history were both saved (its state file is written after both)."""
    rounds = []
    for directory in (source / "checkpoints").glob("round-*"):
        number = directory.name.removeprefix("round-")
        if number.isdigit() and (directory / STATE_FILE).is_file():
            rounds.append(int(number))
    if not rounds:
        raise ConfigError("resume-from", str(source), "no kept checkpoint to continue from (none was saved yet): start it anew")
    last = max(rounds)
    if last >= num_rounds:
        raise ConfigError("resume-from", str(source), f"the run already finished its {num_rounds} rounds")
    return last


def prepare(source: Path, current_flat: Mapping[str, Any], num_rounds: int, run_dir: Path) -> Resume:
    """Check that ``source`` can be continued and set the new ``run_dir`` up to continue it."""
    previous = json.loads((source / "run_config.json").read_text())
    check_compatible(previous, current_flat, source)
    last = last_kept_round(source, num_rounds)
    for leftover in (*(source / "checkpoints").glob(".round-*.partial-*"), *(source / "checkpoints").glob(".round-*.old-*")):
        shutil.rmtree(leftover, ignore_errors=True)  # what the stopped run was writing when it stopped
    kept = source / "checkpoints" / f"round-{last}"
    checkpoint = run_dir / "checkpoints" / f"round-{last}"
    _link_tree(kept, checkpoint)
    earlier = json.loads((source / "history.json").read_text()) if (source / "history.json").is_file() else []
    history = History(RoundRecord.from_json(entry) for entry in earlier if entry["round"] <= last)
    state = json.loads((kept / STATE_FILE).read_text())
    write_json(run_dir / RESUMED_FROM, {"run_dir": str(source), "round": last, "checkpoint": str(kept)})
    return Resume(source, last, checkpoint, history, state["sampler"])


def _link_tree(source: Path, target: Path) -> None:
    """``source``'s files at ``target`` (a server optimizer's state directory included): hard links (no copy
    of a 141 GB model), copies across filesystems."""
    scratch = target.with_name(f".{target.name}.partial-resume")
    shutil.rmtree(scratch, ignore_errors=True)

    def link(file: str, to: str) -> None:
        try:
            os.link(file, to)
        except OSError:
            shutil.copy2(file, to)

    shutil.copytree(source, scratch, copy_function=link)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
