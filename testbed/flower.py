"""Real Flower runs from tests and benchmarks: a `flwr run` simulation or a local federation, offline, cleaned up.

Usage::

    with simulation_superlink(tmp_path) as link:
        result = link.run_app(APP_DIR, run_config="num-rounds=1",
                              federation_config="num-supernodes=3 client-resources-num-cpus=1")
        assert result.ok  # check=True (default) already raised RunFailed otherwise
        outputs = some_dir / str(result.run_id)

Facts this module relies on (read from flwr 1.41.0 and tried on a 2-core machine):

* `flower-superlink --simulation --insecure --host 127.0.0.1 --port P` serves the
  Control, Fleet and Runtime ("serverappio") APIs as HTTP on the single port P, with
  `GET /health` for readiness. `--control-api-address`, `--fleet-api-address` are
  deprecated and `--serverappio-api-address` is refused. It spawns `flower-superexec`,
  which spawns one `flwr-simulation` per run, which starts Ray. Both are launched by
  bare command name, so PATH must contain the bin dir of the flwr installation.
* The superlink starts `flower-superexec` with `start_new_session=True`, so superexec,
  `flwr-simulation` and all Ray processes live in a *different* session and process
  group: killing the superlink's process group misses them. After a SIGTERM to the
  superlink alone, orphaned Ray agents (DashboardAgent, RuntimeEnvAgent) stayed alive
  for good, re-parented to PID 1, and ignored SIGTERM. So teardown finds processes in
  /proc and signals them by PID (SIGTERM, then SIGKILL after a grace period): those
  whose environment carries a per-superlink token, plus every member of their sessions,
  because Ray processes that set their title (`ray::DashboardAgent`) blank their
  /proc/PID/environ. The `flwr` CLI calls get no token: they run in pytest's session.
* A CLI connection is `[superlink.<name>]` in `$FLWR_HOME/config.toml` with
  `address = "host:port"` and `insecure = true` (keys: address, root-certificates,
  insecure, federation; `options.*` is deprecated). An explicit address makes the CLI
  use it as is; only `:local:` would start the detached shared local superlink.
* `--federation-config "num-supernodes=3 client-resources-num-cpus=1"` is merged by the
  superlink into the federation's simulation config for that run only; it works for any
  connection as long as the superlink runs with `--simulation`.
  `client-resources-num-cpus` is an integer (0.5 is rejected). Default: 2 supernodes,
  2 CPUs per ClientApp, i.e. one Ray actor at a time on a 2-core machine.
* `flwr run --stream` returns when the run has finished (the server ends the log stream
  at status `finished`), but its exit code is 0 even when the run failed, and the run id
  is only in human-readable text. `flwr run --format json` prints `{"success", "run-id"}`
  and exits 0 even when it fails (check `success`), and with `--stream` it still waits
  but throws the log away. So `run_app` does `flwr run --format json` (run id), then
  `flwr log RUN_ID --stream` (waits, returns the run's log), then
  `flwr ls --run-id RUN_ID --format json` (status `finished:completed|failed|stopped`
  plus `status-details`, e.g. the ServerApp's exception message).
* The ServerApp and ClientApps run with the superlink's cwd: `SuperLinkHandle.workdir`.
* Ray still keeps its sessions under /tmp/ray. Two simulations at once (another
  superlink's run beside ours) both completed here, but they share the CPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Finding and stopping processes by PID is shared with the local federation launcher.
from flowertune_llm.deploy.federation import LocalFederation
from flowertune_llm.deploy.processes import BIN_DIR as _BIN
from flowertune_llm.deploy.processes import ProcessTracker, terminate
from flowertune_llm.deploy.processes import exe as _exe
from flowertune_llm.deploy.processes import free_port as _free_port

CONNECTION = "harness"
# Set only in the superlink's environment and inherited by everything it starts.
MARKER_VAR = "FLOWER_HARNESS_TOKEN"


class FlowerHarnessError(RuntimeError):
    """The superlink or a `flwr` CLI call misbehaved (not the app itself)."""


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: str  # "finished:completed", "finished:failed" or "finished:stopped"
    details: str  # `status-details` from `flwr ls`: the exception message on failure
    output: str  # the run's log (ServerApp and ClientApp output) from `flwr log`

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


class RunFailed(AssertionError):
    """The run finished with a status other than `finished:completed`."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(
            f"run {result.run_id} ended {result.status}: {result.details}\n"
            f"--- run log (tail) ---\n{_tail(result.output)}"
        )
        self.result = result


@dataclass(frozen=True)
class SuperLinkHandle:
    env: dict[str, str]  # environment for `flwr` CLI calls (FLWR_HOME etc.)
    connection: str  # connection name in $FLWR_HOME/config.toml
    address: str  # host:port of the superlink's HTTP APIs
    log_path: Path  # superlink stdout+stderr
    workdir: Path  # cwd of the ServerApp/ClientApps: relative outputs land here
    pid: int  # the flower-superlink process
    _procs: ProcessTracker

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a `flwr` CLI command against this superlink; raise if it exits non-zero."""
        cmd = [_exe("flwr"), *args]
        proc = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise FlowerHarnessError(
                f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
                f"\n--- superlink log (tail) ---\n{self.log_tail()}"
            )
        return proc

    def run_app(
        self,
        app_dir: Path,
        run_config: str | None = None,
        federation_config: str | None = None,
        timeout: float = 600,
        check: bool = True,
    ) -> RunResult:
        """Submit `app_dir`, wait for the run to finish, return its id, status and log.

        With `check=True` a run that did not complete raises `RunFailed`. A run still
        going after `timeout` seconds is stopped and raises `FlowerHarnessError`.
        """
        deadline = time.monotonic() + timeout
        run_id = self.start_app(app_dir, run_config, federation_config)
        return self.finish(run_id, max(1.0, deadline - time.monotonic()), check)

    def start_app(self, app_dir: Path, run_config: str | None = None, federation_config: str | None = None) -> int:
        """Submit `app_dir` and return its run id at once (`flwr run` without `--stream`)."""
        args = ["run", str(app_dir), self.connection, "--format", "json"]
        if run_config is not None:
            args += ["--run-config", run_config]
        if federation_config is not None:
            args += ["--federation-config", federation_config]
        started = json.loads(self.flwr(*args).stdout)
        if not started.get("success"):  # `--format json` exits 0 even on errors
            raise FlowerHarnessError(
                f"flwr run failed: {started.get('error-message')}\n"
                f"--- superlink log (tail) ---\n{self.log_tail()}"
            )
        return int(started["run-id"])

    def finish(self, run_id: int, timeout: float = 600, check: bool = True) -> RunResult:
        """Wait for run `run_id` to end; its status and log."""
        try:
            # The server closes the stream once the run's status is `finished`.
            streamed = self.flwr("log", str(run_id), self.connection, "--stream", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            with contextlib.suppress(Exception):
                self.flwr("stop", str(run_id), self.connection, timeout=30)
            partial = exc.stdout or b""  # bytes even with text=True
            raise FlowerHarnessError(
                f"run {run_id} still running after {timeout:.0f}s; stopped it\n"
                f"--- run log (tail) ---\n{_tail(_text(partial))}\n"
                f"--- superlink log (tail) ---\n{self.log_tail()}"
            ) from None

        listed = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        run = json.loads(listed.stdout)["runs"][0]
        result = RunResult(run_id, run["status"], run["status-details"], streamed.stdout)
        if check and not result.ok:
            raise RunFailed(result)
        return result

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path.read_text(errors="replace"), lines)

    def pids(self) -> set[int]:
        """Live processes of this superlink: itself, superexec, flwr-simulation, Ray."""
        return self._procs.scan()


def federation_link(federation: LocalFederation) -> SuperLinkHandle:
    """A handle on a running :class:`LocalFederation`'s SuperLink, to submit runs to it like to the simulation."""
    assert federation.superlink is not None, "start the federation first"
    return SuperLinkHandle(
        federation.cli_env, federation.connection, federation.address, federation.superlink_log,
        federation.superlink_dir, federation.superlink.pid, federation.tracker,
    )  # fmt: skip


def timed_federation_run(federation: LocalFederation, app_dir: Path, run_config: str, timeout: float) -> tuple[RunResult, float]:
    """Start ``federation``, run the app on it once, stop it (every process by PID): the run, and its wall seconds
    from submission to the end (the federation's start and stop left out)."""
    with federation:
        started = time.perf_counter()
        result = federation_link(federation).run_app(app_dir, run_config=run_config, timeout=timeout, check=False)
        return result, time.perf_counter() - started


@contextlib.contextmanager
def simulation_superlink(
    tmp_path: Path, startup_timeout: float = 60, grace: float = 10
) -> Iterator[SuperLinkHandle]:
    """Start our own `flower-superlink --simulation`; on exit stop all it started.

    Everything lives in a fresh directory under `tmp_path` (FLWR_HOME, cwd, log), so
    this can be entered several times with the same `tmp_path`.
    """
    root = Path(tempfile.mkdtemp(prefix="superlink-", dir=tmp_path))
    home, workdir, log_path = root / "flwr-home", root / "workdir", root / "superlink.log"
    home.mkdir()
    workdir.mkdir()
    address = f"127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "PATH": f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Otherwise every run `uv sync`s the app's dependencies: slow, fails offline.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    env.pop(MARKER_VAR, None)  # in case pytest itself runs under another harness
    # Our connection is also the default, so a bare `flwr ls` can never start `:local:`.
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )
    procs = ProcessTracker(var=MARKER_VAR)
    cmd = [
        _exe("flower-superlink"), "--simulation", "--insecure",
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env={**env, **procs.env()},
            stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in pytest must not reach it before teardown
        )  # fmt: skip
        handle = SuperLinkHandle(env, CONNECTION, address, log_path, workdir, proc.pid, procs)
        try:
            _wait_healthy(proc, handle, startup_timeout)
            procs.scan()  # note superexec's session now, while it is surely alive
            yield handle
        finally:
            _terminate(proc, procs, grace)


def _terminate(proc: subprocess.Popen[bytes], procs: ProcessTracker, grace: float) -> None:
    if left := terminate(procs, [proc], grace):
        raise FlowerHarnessError(f"processes survived teardown: {sorted(left)}")


def _wait_healthy(proc: subprocess.Popen[bytes], handle: SuperLinkHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # e.g. port taken between _free_port() and bind
            raise FlowerHarnessError(
                f"flower-superlink exited with {proc.returncode}\n{handle.log_tail()}"
            )
        url = f"http://{handle.address}/health"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise FlowerHarnessError(f"flower-superlink not healthy after {timeout}s\n{handle.log_tail()}")


def _text(data: str | bytes) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])
