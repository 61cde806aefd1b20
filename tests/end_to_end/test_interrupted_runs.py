"""Runs you can trust, in real `flwr run`s: a run stopped (or its ServerApp killed) after its round-2 checkpoint and
resumed ends with the same bytes as the shared run that never stopped; the same seed gives the same history."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from testbed.flower import SuperLinkHandle, simulation_superlink

from conftest import APP_DIR, QUICKSTART_FEDERATION, QUICKSTART_ROUNDS, files_of, quickstart_config

pytestmark = pytest.mark.simulation
STATE = "flowertune_state.json"


def history_without_seconds(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in json.loads((run_dir / "history.json").read_text())]


def start_and_interrupt(link: SuperLinkHandle, output_dir: Path, how: str) -> Path:
    """Start the shared run's config, wait for its round-2 checkpoint, then stop the run or kill its ServerApp."""
    run_id = link.start_app(APP_DIR, quickstart_config(output_dir), QUICKSTART_FEDERATION)
    run_dir = output_dir / str(run_id)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "round-2" / STATE).is_file():
        assert time.monotonic() < deadline, f"no round-2 checkpoint after 300 s\n{link.log_tail()}"
        time.sleep(0.2)
    if how == "stop":
        link.flwr("stop", str(run_id), link.connection)
        assert link.finish(run_id, timeout=120, check=False).status == "finished:stopped"
    else:  # SIGKILL the process the ServerApp runs in (the Simulation Engine's flwr-simulation)
        for pid in link.pids():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"flwr-simulation" in command:
                os.kill(pid, signal.SIGKILL)
    return run_dir


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_run_interrupted_after_round_2_resumes_to_the_same_bytes(quickstart_run, tmp_path, how):
    _, reference = quickstart_run
    output_dir = tmp_path / "runs"
    with simulation_superlink(tmp_path) as link:
        stopped = start_and_interrupt(link, output_dir, how)
    # The same seed, a fresh run: the same round-2 checkpoint and the same history up to it.
    assert files_of(stopped / "checkpoints" / "round-2") == files_of(reference / "checkpoints" / "round-2")
    assert history_without_seconds(stopped)[:2] == history_without_seconds(reference)[:2]

    with simulation_superlink(tmp_path) as link:  # a fresh SuperLink: new node ids, as after a crash
        result = link.run_app(APP_DIR, quickstart_config(output_dir, **{"resume-from": f"'{stopped}'"}),
                              federation_config=QUICKSTART_FEDERATION)  # fmt: skip
    resumed = output_dir / str(result.run_id)
    assert f"Resuming {stopped} after round 2" in result.output
    final = f"round-{QUICKSTART_ROUNDS}"
    assert files_of(resumed / "checkpoints" / final) == files_of(reference / "checkpoints" / final)
    assert history_without_seconds(resumed) == history_without_seconds(reference)
    assert json.loads((resumed / "resumed_from.json").read_text())["round"] == 2
    assert not list((stopped / "checkpoints").glob(".round-*"))  # what it was writing when stopped is gone
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["round-2", final]
