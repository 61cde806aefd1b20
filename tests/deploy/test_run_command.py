"""`flowertune-llm run`: the run config checked first, the local SuperLink kept from installing, Ctrl-C stopping
the run, and an exit status that says how the run ended. Real `flwr run`s on a simulation SuperLink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flowertune_llm.deploy import run_command as run_module
from flowertune_llm.deploy.processes import exe, free_port
from testbed.flower import simulation_superlink

from conftest import APP_DIR, FLOWERTUNE_RUN

FLOWERTUNE = FLOWERTUNE_RUN


def flowertune_run(link, *arguments: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLOWERTUNE, str(APP_DIR), link.connection, *arguments], env=link.env, cwd=APP_DIR,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    with simulation_superlink(tmp_path_factory.mktemp("run-command")) as handle:
        yield handle


def test_a_bad_key_fails_in_under_two_seconds_with_one_line_and_status_2(tmp_path):
    for run_config, message in [("bogus.key=1", "run config `bogus.key` = 1: unknown key (README, Configuration, lists them)"),
                                ("model.quantization=3", "run config `model.quantization` = 3: allowed: 0, 4, 8")]:  # fmt: skip
        started = time.monotonic()
        done = subprocess.run([*FLOWERTUNE, str(APP_DIR), "--run-config", run_config], capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip
        assert time.monotonic() - started < 2.0
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {message}"], done.stderr


def test_a_good_run_exits_0_and_prints_its_run_directory(fedprox_run):
    done, result, run_dir = fedprox_run  # a FedProx run shared with test_strategies.py (conftest)
    assert done.returncode == 0 and result.ok, done.stdout[-3000:] + done.stderr
    assert int(run_module._STARTED.search(done.stdout).group(1)) == result.run_id
    assert f"Run directory: {run_dir}" in done.stderr and f"Run {result.run_id}: finished:completed" in done.stderr
    assert (run_dir / "history.json").is_file()


def test_a_failed_run_exits_1(link, tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    done = flowertune_run(link, "--run-config",
                          f"preset='quickstart' num-server-rounds=1 output.dir='{tmp_path}' static.dataset.name='{missing}'")  # fmt: skip
    assert done.returncode == 1 and "finished:failed" in done.stderr, done.stderr
    # The server refuses the missing file in one line naming it, without Flower's traceback.
    refused = [line for line in done.stdout.splitlines() if "Run config refused:" in line]
    assert len(refused) == 1 and str(missing) in refused[0] and "Traceback" not in done.stdout, done.stdout[-3000:]


def test_ctrl_c_stops_the_run_and_exits_130(link, tmp_path):
    process = subprocess.Popen([*FLOWERTUNE, str(APP_DIR), link.connection, "--run-config",
                                f"preset='quickstart' num-server-rounds=50 output.dir='{tmp_path}'"],
                               env=link.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        run_id = None
        assert process.stdout is not None
        for line in process.stdout:
            found = run_module._STARTED.search(line)
            if found:
                run_id = int(found.group(1))
                break
        assert run_id is not None
        time.sleep(3)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and f"Run {run_id}: finished:stopped" in err, err
    listed = json.loads(link.flwr("ls", link.connection, "--run-id", str(run_id), "--format", "json").stdout)
    assert listed["runs"][0]["status"] == "finished:stopped"


def test_a_local_superlink_that_would_install_dependencies_is_restarted(tmp_path, monkeypatch):
    """One started as `flwr` starts it, but without FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION: found by its
    port and FLWR_HOME, and stopped so that the `flwr run` that follows starts one that installs nothing."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    port = str(free_port())
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.delenv(run_module.DISABLE_INSTALL, raising=False)
    monkeypatch.setattr("flwr.cli.constant.LOCAL_SUPERLINK_HTTP_API_PORT", port)
    command = [exe("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", port,
               "--control-api-address", f"127.0.0.1:{free_port()}"]  # as flwr starts it, on free ports
    superlink = subprocess.Popen(command, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 cwd=tmp_path)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not run_module._superlinks_on(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid, _, _ in run_module._superlinks_on(port)] == [superlink.pid]
        run_module._ensure_local_superlink_installs_nothing(None)
        assert superlink.wait(timeout=30) is not None and run_module._superlinks_on(port) == []
    finally:
        if superlink.poll() is None:
            superlink.kill()


def test_a_superlink_of_this_flwr_home_that_installs_nothing_is_left_alone(tmp_path, monkeypatch):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    monkeypatch.setenv("FLWR_HOME", str(home))
    seen = [(4242, ["flower-superlink", "--port", "39091"], {"FLWR_HOME": str(home), run_module.DISABLE_INSTALL: "1"})]
    monkeypatch.setattr(run_module, "_superlinks_on", lambda port: seen)
    monkeypatch.setattr(run_module.os, "kill", lambda *a: pytest.fail("must not be stopped"))
    run_module._ensure_local_superlink_installs_nothing(None)
    other = [(4242, ["flower-superlink"], {"FLWR_HOME": str(tmp_path / "elsewhere")})]
    monkeypatch.setattr(run_module, "_superlinks_on", lambda port: other)
    with pytest.raises(RuntimeError, match="belongs to FLWR_HOME="):
        run_module._ensure_local_superlink_installs_nothing(None)


def test_resolve_run_config_reads_overrides_as_flwr_does(tmp_path):
    flat = run_module.resolve_run_config(["model.name='a/b' num-server-rounds=3"], preset="quickstart")
    assert flat["model.name"] == "a/b" and flat["num-server-rounds"] == 3 and flat["preset"] == "quickstart"
    toml = tmp_path / "run.toml"
    toml.write_text('num-server-rounds = 7\n[model]\nname = "c/d"\n')
    assert run_module.resolve_run_config([str(toml)])["model.name"] == "c/d"
    with pytest.raises(ValueError, match="--run-config"):
        run_module.resolve_run_config([str(toml), "num-server-rounds=2"])  # Flower refuses a file next to pairs
    assert Path(APP_DIR).is_dir()
