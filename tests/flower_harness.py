"""Run a real `flwr run` simulation from pytest, offline, and clean up every process.

Usage::

    with simulation_superlink(tmp_path) as link:
        result = link.run_app(APP_DIR, run_config="num-rounds=1",
                              federation_config="num-supernodes=3 client-resources-num-cpus=1")
        assert result.ok, result.output
        outputs = some_dir / str(result.run_id)

Facts this module relies on (read from flwr 1.41.0 and tried on a 2-core machine):

* `flower-superlink --simulation --insecure --host 127.0.0.1 --port P` serves the
  Control, Fleet and Runtime ("serverappio") APIs as HTTP on the single port P, with
  `GET /health` for readiness. `--control-api-address`, `--fleet-api-address` and
  `--serverappio-api-address` are deprecated or refused. It spawns `flower-superexec`,
  which spawns one `flwr-simulation` per run, which starts Ray. Both are launched by
  bare command name, so PATH must contain the bin dir of the flwr installation.
* The superlink starts `flower-superexec` with `start_new_session=True`, so superexec,
  `flwr-simulation` and all Ray processes live in a *different* session and process
  group: killing the superlink's process group misses them. After a SIGTERM to the
  superlink, orphaned Ray agents (DashboardAgent, RuntimeEnvAgent) stayed alive for
  good and ignored SIGTERM. Hence we tag every process with a unique environment
  variable (inherited all the way down to Ray workers), find them in /proc, and signal
  them by PID: SIGTERM, then SIGKILL after a grace period.
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
* Ray itself still uses /tmp/ray and fixed default ports (dashboard 8265), so do not run
  two simulations at once (e.g. under pytest-xdist).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

CONNECTION = "harness"
# Inherited by every process the superlink starts; it is how teardown finds them.
MARKER_VAR = "FLOWER_HARNESS_TOKEN"
_BIN = Path(sys.executable).parent  # where pip put flwr's console scripts


class FlowerHarnessError(RuntimeError):
    """The superlink or a `flwr` CLI call misbehaved (not the app itself)."""


class RunFailed(AssertionError):
    """The run finished with a status other than `finished:completed`."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(
            f"run {result.run_id} ended {result.status}: {result.details}\n"
            f"--- run log (tail) ---\n{_tail(result.output)}"
        )
        self.result = result


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed", "finished:stopped"
    details: str  # `status-details` from `flwr ls`: the exception message on failure
    output: str  # the run's log (ServerApp and ClientApp output) from `flwr log`

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


@dataclass(frozen=True)
class SuperLinkHandle:
    env: dict[str, str]  # environment for `flwr` CLI calls (FLWR_HOME etc.)
    connection: str  # connection name in $FLWR_HOME/config.toml
    address: str  # host:port of the superlink's HTTP APIs
    log_path: Path  # superlink stdout+stderr
    workdir: Path  # cwd of the ServerApp/ClientApps: relative outputs land here
    token: str  # value of MARKER_VAR in every process this superlink started

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
        """Submit `app_dir`, wait for the run to finish and return its id, status and log.

        With `check=True` a run that did not complete raises `RunFailed`; a run still
        going after `timeout` seconds is stopped and raises `FlowerHarnessError`.
        """
        deadline = time.monotonic() + timeout
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
        run_id = int(started["run-id"])

        try:
            # The server closes the stream once the run's status is `finished`.
            streamed = self.flwr(
                "log", str(run_id), self.connection, "--stream",
                timeout=max(1.0, deadline - time.monotonic()),
            )
        except subprocess.TimeoutExpired as exc:
            with contextlib.suppress(Exception):
                self.flwr("stop", str(run_id), self.connection, timeout=30)
            partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            raise FlowerHarnessError(
                f"run {run_id} still running after {timeout:.0f}s; stopped it\n"
                f"--- run log (tail) ---\n{_tail(partial)}\n"
                f"--- superlink log (tail) ---\n{self.log_tail()}"
            ) from None

        listed = json.loads(
            self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json").stdout
        )
        run = listed["runs"][0]
        result = RunResult(run_id, run["status"], run["status-details"], streamed.stdout)
        if check and not result.ok:
            raise RunFailed(result)
        return result

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path.read_text(errors="replace"), lines)

    def pids(self) -> set[int]:
        """Live processes started (directly or not) by this superlink."""
        return marked_pids(self.token)


@contextlib.contextmanager
def simulation_superlink(
    tmp_path: Path, startup_timeout: float = 60, grace: float = 10
) -> Iterator[SuperLinkHandle]:
    """Start our own `flower-superlink --simulation` and stop all it started on exit.

    Everything lives in a fresh directory under `tmp_path` (FLWR_HOME, cwd, log), so the
    context manager can be used several times with the same `tmp_path`.
    """
    root = Path(tempfile.mkdtemp(prefix="superlink-", dir=tmp_path))
    home, workdir = root / "flwr-home", root / "workdir"
    home.mkdir()
    workdir.mkdir()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    token = uuid.uuid4().hex
    env = {
        **os.environ,
        "PATH": f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # superexec, flwr-simulation
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Otherwise every run `uv sync`s the app's dependencies: slow, fails offline.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        MARKER_VAR: token,
    }
    # Our connection is also the default, so a stray `flwr ls` can never start `:local:`.
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )
    handle = SuperLinkHandle(env, CONNECTION, address, root / "superlink.log", workdir, token)
    cmd = [
        _exe("flower-superlink"), "--simulation", "--insecure",
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with handle.log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in pytest must not hit it before teardown
        )  # fmt: skip
        try:
            _wait_healthy(proc, handle, startup_timeout)
            yield handle
        finally:
            _terminate(proc, token, grace)


def marked_pids(token: str) -> set[int]:
    """PIDs whose environment holds MARKER_VAR=token (zombies have none: already dead)."""
    needle = f"{MARKER_VAR}={token}".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.add(int(entry.name))
    return found


def _terminate(proc: subprocess.Popen[bytes], token: str, grace: float) -> None:
    # Several passes: superexec may launch a new flwr-simulation while we are killing.
    for _ in range(3):
        pids = marked_pids(token) | ({proc.pid} if proc.poll() is None else set())
        if not pids:
            break
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap our own child so it does not linger as a zombie
            if not (marked_pids(token) & pids):
                break
            time.sleep(0.1)
        stubborn = marked_pids(token) & pids
        if stubborn:  # e.g. Ray's DashboardAgent/RuntimeEnvAgent ignore SIGTERM
            log.info("SIGKILL after %.0fs: %s", grace, sorted(stubborn))
            _signal(stubborn, signal.SIGKILL)
            time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    if left := marked_pids(token):
        raise FlowerHarnessError(f"processes survived teardown: {sorted(left)}")


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_healthy(proc: subprocess.Popen[bytes], handle: SuperLinkHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # e.g. port taken between _free_port() and bind
            raise FlowerHarnessError(
                f"flower-superlink exited with {proc.returncode}\n{handle.log_tail()}"
            )
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://{handle.address}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise FlowerHarnessError(f"flower-superlink not healthy after {timeout}s\n{handle.log_tail()}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _exe(name: str) -> str:
    # Prefer the scripts of the interpreter running pytest: PATH may not have its venv.
    path = _BIN / name
    return str(path) if path.exists() else name


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])
