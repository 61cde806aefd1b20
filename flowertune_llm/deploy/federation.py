"""Flower's Deployment Engine on one machine: a SuperLink and N SuperNodes on 127.0.0.1.

:class:`LocalFederation` starts them, optionally with TLS and SuperNode authentication, writes a ``flwr``
CLI connection to it, and guarantees that every process it started (also ``flower-superexec``,
``flwr-serverapp``, the ``flwr-clientapp`` processes the SuperNodes spawn per message and the nodes'
persistent workers) is stopped by PID when it exits (processes.py). ``flowertune-llm federation`` runs
it until Ctrl-C (commands.py); the deployment tests and benchmarks use it directly.

Facts from flwr 1.41-1.42's source that shape it:

* SuperNode authentication is registration first: with ``--enable-supernode-auth`` the SuperLink refuses
  the Fleet API's self-registration, so ``flwr supernode register KEY.pub CONNECTION`` (Control API) must
  create the node, and its node id, *before* the SuperNode's ``ActivateNode`` finds it by public key. An
  unregistered key is refused and ``flower-supernode`` exits. Authentication also requires TLS: a SuperNode
  with ``--insecure`` and a private key refuses to start.
* Every Flower process is found and stopped through :class:`~flowertune_llm.deploy.processes.ProcessTracker`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowertune_llm.deploy.certificates import Certificates, SuperNodeKey, make_certificates, make_supernode_key
from flowertune_llm.deploy.cli_config import (
    default_connection,
    default_flwr_home,
    node_config_arg,
    remove_cli_connection,
    write_cli_connection,
)
from flowertune_llm.deploy.processes import BIN_DIR, ProcessTracker, exe, free_port, signal_pids, tail, terminate

DEFAULT_CONNECTION = "local-deployment"


class FederationError(RuntimeError):
    """A Flower process or `flwr` CLI call of the local federation misbehaved."""


@dataclass
class SuperNodeHandle:
    name: str  # supernode-<i>
    node_config: str  # what --node-config got
    home: Path  # its FLWR_HOME; its directory is the ClientApps' working directory
    log_path: Path  # stdout+stderr of the SuperNode, its SuperExec and its ClientApps
    port: int  # its Runtime API (ClientApps connect here)
    key: SuperNodeKey | None
    proc: subprocess.Popen[bytes]
    node_id: int | None = None  # from `flwr supernode register`, or from the log once connected

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


_NODE_ID = re.compile(r"SuperNode ID: (\d+)")


@dataclass(eq=False)
class LocalFederation:
    """A SuperLink and ``num_supernodes`` SuperNodes on loopback, a CLI connection to it, and their teardown.

    ``with LocalFederation(tmp, num_supernodes=2, tls=True, auth=True) as fed:`` then
    ``fed.flwr("run", app_dir, fed.connection, "--stream")``. Layout under ``workdir``: ``certs/``,
    ``keys/``, ``superlink/`` (the ServerApp's working directory, FLWR_HOME in ``flwr-home/``),
    ``supernode-<i>/`` likewise, ``logs/`` and ``cli/`` (the CLI's FLWR_HOME unless ``cli_home`` is given).
    Node ``i`` gets ``node_configs[i]`` or ``partition-id=i num-partitions=N``. ``env`` is added to the
    environment of every Flower process (e.g. ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``), ``supernode_env`` to the
    SuperNodes' (and so their ClientApps') only. Unless set, ``OMP_NUM_THREADS`` is cores // N for the SuperNodes,
    so their ClientApps share the machine instead of each using every core.
    """

    workdir: Path
    num_supernodes: int = 2
    tls: bool = False
    auth: bool = False
    node_configs: Sequence[str | Mapping[str, Any]] | None = None
    sans: Sequence[str] = ()
    connection: str = DEFAULT_CONNECTION
    cli_home: Path | None = None
    make_default: bool = True  # make `connection` the CLI's default (never `:local:` by accident)
    port: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    supernode_env: Mapping[str, str] = field(default_factory=dict)  # on top of `env`, for SuperNodes only
    startup_timeout: float = 60
    grace: float = 10

    def __post_init__(self) -> None:
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS: Flower refuses a private key on an insecure link")
        if self.node_configs is not None and len(self.node_configs) != self.num_supernodes:
            raise ValueError(f"{len(self.node_configs)} node configs for {self.num_supernodes} SuperNodes")
        self.workdir = Path(self.workdir).resolve()
        self.cli_home = Path(self.cli_home or self.workdir / "cli").expanduser().resolve()
        self.tracker = ProcessTracker()
        self.certificates: Certificates | None = None
        self.address = ""
        self.superlink: subprocess.Popen[bytes] | None = None
        self.superlink_log = self.workdir / "logs" / "superlink.log"
        self.superlink_dir = self.workdir / "superlink"
        self.supernodes: list[SuperNodeHandle] = []
        self._worker_dir: Path | None = None
        self._worker_dir_is_temporary = False
        self._started = False
        self._wrote_connection = False
        self._default_before: str | None = None

    # -- environment ------------------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != self.tracker.var}
        env.update(
            PATH=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    @property
    def cli_env(self) -> dict[str, str]:
        """Environment for `flwr` CLI calls against this federation."""
        return {**self._base_env(), "FLWR_HOME": str(self.cli_home)}

    def supernode_environment(self) -> dict[str, str]:
        """The SuperNodes' extra environment; unless set, it splits this machine's cores among them.

        Each ClientApp is a fresh process whose torch uses one thread per core: N of them on one machine
        oversubscribe it N-fold (ten times slower optimizer steps were measured with 2 nodes on 2 cores).
        The Simulation Engine does the same split (Ray sets OMP_NUM_THREADS to an actor's CPUs).
        """
        env = dict(self.supernode_env)
        given = {**os.environ, **self.env, **env}
        if "OMP_NUM_THREADS" not in given:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, self.num_supernodes)))
        if "FLOWERTUNE_LLM_WORKER_DIR" not in given:  # the nodes' persistent workers (worker.py), not ~/.cache
            env["FLOWERTUNE_LLM_WORKER_DIR"] = str(self.worker_dir)
        return env

    @property
    def worker_dir(self) -> Path:
        """Where the SuperNodes' persistent workers keep their socket, key and log (``node-<id>-<code>.*``)."""
        if self._worker_dir is None:
            given = {**os.environ, **self.env, **self.supernode_env}.get("FLOWERTUNE_LLM_WORKER_DIR")
            path = self.workdir / "workers"
            if given:
                path = Path(given).expanduser()
            elif len(str(path)) > 60:  # a Unix socket path holds at most 107 bytes; the worker adds ~45
                path = Path(tempfile.mkdtemp(prefix="ftllm-workers-"))
                self._worker_dir_is_temporary = True
                with contextlib.suppress(OSError):
                    (self.workdir / "workers").symlink_to(path, target_is_directory=True)
            self._worker_dir = path
        return self._worker_dir

    def worker_log(self, node: SuperNodeHandle) -> Path | None:
        """The log of ``node``'s persistent worker (its ClientApps' training output), if it started one."""
        logs = sorted(self.worker_dir.glob(f"node-{node.node_id}-*.log"), key=lambda p: p.stat().st_mtime)
        return logs[-1] if logs else None

    def _process_env(self, flwr_home: Path, extra: Mapping[str, str]) -> dict[str, str]:
        return {
            **self._base_env(),
            # Otherwise every run `uv sync`s the app's dependencies: slow, and impossible offline.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            **self.env,
            **extra,
            "FLWR_HOME": str(flwr_home),
            **self.tracker.env(),
        }

    def _spawn(
        self, cmd: list[str], cwd: Path, flwr_home: Path, log_path: Path, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        cwd.mkdir(parents=True, exist_ok=True)
        flwr_home.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=self._process_env(flwr_home, extra_env or {}),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C at the terminal must not reach it before our teardown
            )
        self.tracker.scan()  # note its session now
        return proc

    # -- lifecycle --------------------------------------------------------------------------------------

    def __enter__(self) -> LocalFederation:  # noqa: PYI034 (Self needs Python 3.11)
        try:
            self.start()
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(check=exc_info[0] is None)

    def start(self) -> LocalFederation:
        import atexit

        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop, check=False)
        self._started = True
        if self.tls:
            self.certificates = make_certificates(self.workdir / "certs", self.sans)
        port = self.port or free_port()
        self.address = f"127.0.0.1:{port}"
        cmd = [
            exe("flower-superlink"),
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        cmd += self.certificates.superlink_args() if self.certificates else ["--insecure"]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        self.superlink = self._spawn(cmd, self.superlink_dir, self.superlink_dir / "flwr-home", self.superlink_log)
        self._wait_healthy()
        self._default_before = default_connection(self.cli_home)
        self._wrote_connection = True
        write_cli_connection(
            self.cli_home,
            self.connection,
            self.address,
            self.certificates.ca_cert if self.certificates else None,
            self.make_default,
        )
        configs = self.node_configs or [
            f"partition-id={i} num-partitions={self.num_supernodes}" for i in range(self.num_supernodes)
        ]
        started = [self.add_supernode(config, wait=False) for config in configs]
        for handle in started:
            self.wait_connected(handle)
        return self

    def stop(self, check: bool = True) -> set[int]:
        """Stop every process this federation started (SuperNodes first); raise if any survive and ``check``."""
        import atexit
        import threading

        if not self._started:
            return set()
        atexit.unregister(self.stop)
        in_main = threading.current_thread() is threading.main_thread()
        # A second Ctrl-C (or a SIGTERM) must not cut the teardown short.
        masked = (signal.SIGINT, signal.SIGTERM) if in_main else ()
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in masked}
        try:
            # SuperNodes first, so they deactivate while the SuperLink still answers, then everything.
            nodes = [h.proc for h in self.supernodes]
            signal_pids([p.pid for p in nodes if p.poll() is None], signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            while any(p.poll() is None for p in nodes) and time.monotonic() < deadline:
                time.sleep(0.1)
            procs = [*nodes, *([self.superlink] if self.superlink else [])]
            left = terminate(self.tracker, procs, self.grace)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._started = False
        if self._wrote_connection:  # a connection to a SuperLink that is gone would only mislead `flwr`
            remove_cli_connection(self.cli_home, self.connection, self._default_before)
            self._wrote_connection = False
        if not left:
            self._keep_worker_logs()
        if left and check:
            raise FederationError(f"processes survived teardown: {sorted(left)}")
        return left

    def _keep_worker_logs(self) -> None:
        """Move the workers' logs from a temporary worker directory into ``workdir/workers``, and remove it.

        The sockets, keys and locks there served the stopped workers only; the logs are what a reader wants.
        """
        if not self._worker_dir_is_temporary or self._worker_dir is None:
            return
        temporary, kept = self._worker_dir, self.workdir / "workers"
        if kept.is_symlink():
            kept.unlink()
        kept.mkdir(parents=True, exist_ok=True)
        for log in temporary.glob("*.log"):
            shutil.move(log, kept / log.name)
        shutil.rmtree(temporary, ignore_errors=True)
        self._worker_dir, self._worker_dir_is_temporary = kept, False

    def pids(self) -> set[int]:
        """Live processes of this federation: SuperLink, SuperNodes, SuperExecs, ServerApps, ClientApps."""
        own = [self.superlink, *(h.proc for h in self.supernodes)]
        return self.tracker.scan() | {p.pid for p in own if p is not None and p.poll() is None}

    # -- SuperNodes -------------------------------------------------------------------------------------

    def add_supernode(
        self,
        node_config: str | Mapping[str, Any],
        *,
        register: bool = True,
        key: SuperNodeKey | None = None,
        wait: bool = True,
    ) -> SuperNodeHandle:
        """Start one more SuperNode; with auth, make (or take) its key and register it unless ``register=False``.

        With ``wait``, return once it is connected; raise :class:`FederationError` (with its log) if it exits.
        """
        index = len(self.supernodes)
        name = f"supernode-{index}"
        config = node_config_arg(node_config)
        node_dir = self.workdir / name
        node_id = None
        if self.auth:
            key = key or make_supernode_key(self.workdir / "keys", name)
            if register:
                node_id = self.register(key.public)
        port = free_port()
        cmd = [exe("flower-supernode"), "--superlink", self.address, "--port", str(port)]
        cmd += ["--root-certificates", str(self.certificates.ca_cert)] if self.certificates else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key.private)]
        cmd += ["--node-config", config]
        log_path = self.workdir / "logs" / f"{name}.log"
        proc = self._spawn(cmd, node_dir, node_dir / "flwr-home", log_path, self.supernode_environment())
        handle = SuperNodeHandle(name, config, node_dir / "flwr-home", log_path, port, key, proc, node_id)
        self.supernodes.append(handle)
        if wait:
            self.wait_connected(handle)
        return handle

    def register(self, public_key: Path) -> int:
        """`flwr supernode register`: the SuperLink creates the node (and its id) before the SuperNode connects."""
        out = self.flwr("supernode", "register", str(public_key), self.connection, "--format", "json").stdout
        reply = json.loads(out[out.index("{") :])
        if not reply.get("success"):  # `--format json` exits 0 on errors
            raise FederationError(f"registering {public_key} failed: {reply.get('error-message')}")
        return int(reply["node-id"])

    def wait_connected(self, handle: SuperNodeHandle, timeout: float | None = None) -> int:
        """Wait for the SuperNode's "SuperNode ID: N" (it activated at the SuperLink) and return N."""
        timeout = timeout or self.startup_timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := _NODE_ID.search(handle.log_text()):
                handle.node_id = int(match.group(1))
                return handle.node_id
            if handle.proc.poll() is not None:
                raise FederationError(
                    f"{handle.name} exited with {handle.proc.returncode}\n--- {handle.log_path} ---\n"
                    f"{tail(handle.log_text())}"
                )
            time.sleep(0.1)
        raise FederationError(f"{handle.name} not connected after {timeout:.0f}s\n{tail(handle.log_text())}")

    def _wait_healthy(self) -> None:
        import ssl

        assert self.superlink is not None
        scheme = "https" if self.certificates else "http"
        context = ssl.create_default_context(cafile=str(self.certificates.ca_cert)) if self.certificates else None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:  # e.g. the port was taken between free_port() and bind
                raise FederationError(
                    f"flower-superlink exited with {self.superlink.returncode}\n{self.superlink_tail()}"
                )
            url = f"{scheme}://{self.address}/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1, context=context) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.1)
        raise FederationError(f"flower-superlink not healthy after {self.startup_timeout}s\n{self.superlink_tail()}")

    def superlink_tail(self, lines: int = 40) -> str:
        return tail(self.superlink_log.read_text(errors="replace"), lines) if self.superlink_log.exists() else ""

    # -- the CLI ----------------------------------------------------------------------------------------

    def flwr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a `flwr` CLI command with this federation's CLI FLWR_HOME; raise if it exits non-zero and ``check``."""
        cmd = [exe("flwr"), *args]
        proc = subprocess.run(cmd, env=self.cli_env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise FederationError(
                f"{shlex.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
                f"\n--- superlink log (tail) ---\n{self.superlink_tail()}"
            )
        return proc

    def run_command(self, app: str = ".", run_config: str = "preset='quickstart'") -> str:
        """The exact command that runs ``app`` on this federation, its logs streamed: the quickstart by default,
        which needs nothing from the Hub (the app's own default model and data would)."""
        prefix = ""
        if self.cli_home != default_flwr_home():
            prefix = f"FLWR_HOME={shlex.quote(str(self.cli_home))} "
        return f"{prefix}flowertune-llm run {shlex.quote(app)} {self.connection} --run-config {shlex.quote(run_config)}"
