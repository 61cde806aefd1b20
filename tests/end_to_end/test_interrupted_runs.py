"""Runs you can trust, in real `flwr run`s: a run stopped after its round-2 checkpoint, resumed, the resumed run's
ServerApp killed, and that resumed again, ends with the same bytes as the shared run that never stopped; the same
seed gives the same history."""

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


def _wait_for(condition, link: SuperLinkHandle, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {timeout:.0f} s\n{link.log_tail()}"
        time.sleep(0.05)


def _kill_the_server_app(link: SuperLinkHandle) -> None:
    """SIGKILL the process the ServerApp runs in (the Simulation Engine's flwr-simulation), as a crash would."""
    for pid in link.pids():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flwr-simulation" in command:
            os.kill(pid, signal.SIGKILL)


def test_a_run_stopped_then_resumed_and_killed_then_resumed_again_ends_with_the_same_bytes(quickstart_run, tmp_path):
    """One chain of three runs of the shared run's config: A is stopped (`flwr stop`) after its round-2 checkpoint;
    B resumes A and its ServerApp is killed (SIGKILL) during round 4, before its next checkpoint; C resumes B, whose
    last kept checkpoint is the round 2 it took over. C ends with the bytes and history of the run that never
    stopped. (Two separate interrupted-and-resumed runs cost one real run more: ~25 s of the suite.)"""
    _, reference = quickstart_run
    output_dir = tmp_path / "runs"
    with simulation_superlink(tmp_path) as link:
        run_a = link.start_app(APP_DIR, quickstart_config(output_dir), QUICKSTART_FEDERATION)
        stopped = output_dir / str(run_a)
        _wait_for(lambda: (stopped / "checkpoints" / "round-2" / STATE).is_file(), link, "no round-2 checkpoint")
        link.flwr("stop", str(run_a), link.connection)
        assert link.finish(run_a, timeout=120, check=False).status == "finished:stopped"
    # The same seed, a fresh run: the same round-2 checkpoint and the same history up to it.
    assert files_of(stopped / "checkpoints" / "round-2") == files_of(reference / "checkpoints" / "round-2")
    assert history_without_seconds(stopped)[:2] == history_without_seconds(reference)[:2]

    with simulation_superlink(tmp_path) as link:  # a fresh SuperLink: new node ids, as after a crash
        run_b = link.start_app(APP_DIR, quickstart_config(output_dir, **{"resume-from": f"'{stopped}'"}), QUICKSTART_FEDERATION)
        crashed = output_dir / str(run_b)

        def round_3_recorded() -> bool:
            try:
                return len(json.loads((crashed / "history.json").read_text())) >= 3
            except (OSError, ValueError):
                return False

        _wait_for(round_3_recorded, link, "no round-3 record")
        _kill_the_server_app(link)  # round 4 is under way: its checkpoint is the run's next and last
    assert not (crashed / "checkpoints" / f"round-{QUICKSTART_ROUNDS}" / STATE).is_file(), "killed too late"
    assert json.loads((crashed / "resumed_from.json").read_text())["round"] == 2

    with simulation_superlink(tmp_path) as link:
        result = link.run_app(APP_DIR, quickstart_config(output_dir, **{"resume-from": f"'{crashed}'"}),
                              federation_config=QUICKSTART_FEDERATION)  # fmt: skip
    resumed = output_dir / str(result.run_id)
    assert f"Resuming {crashed} after round 2" in result.output
    final = f"round-{QUICKSTART_ROUNDS}"
    assert files_of(resumed / "checkpoints" / final) == files_of(reference / "checkpoints" / final)
    assert history_without_seconds(resumed) == history_without_seconds(reference)
    assert json.loads((resumed / "resumed_from.json").read_text())["round"] == 2
    for interrupted in (stopped, crashed):  # what each was writing when it was interrupted is gone
        assert not list((interrupted / "checkpoints").glob(".round-*"))
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["round-2", final]
