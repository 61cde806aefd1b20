"""Flower's Deployment Engine on one machine: TLS certificates, SuperNode keys and a local federation.

Three tools, for trying the app on real SuperLink/SuperNode processes before the nodes are real machines:

* :func:`make_certificates`: a CA and a SuperLink server certificate whose SANs name the addresses the
  SuperNodes and the ``flwr`` CLI dial (``ca.crt``, ``server.pem``, ``server.key``: what
  ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile`` takes).
* :func:`make_supernode_key`: an ECDSA P-384 key pair for SuperNode authentication. The private key is
  OpenSSH PEM (``flower-supernode --auth-supernode-private-key`` reads it with cryptography's
  ``load_ssh_private_key``), the public key one OpenSSH line (``flwr supernode register`` reads it with
  ``load_ssh_public_key`` and accepts NIST curves only, so not ed25519); both are what
  ``ssh-keygen -t ecdsa -b 384`` writes.
* :class:`LocalFederation`: a SuperLink and N SuperNodes on 127.0.0.1, optionally with TLS and SuperNode
  authentication, a ``flwr`` CLI connection to it, and the guarantee that every process it started (also
  ``flower-superexec``, ``flwr-serverapp``, the ``flwr-clientapp`` processes the SuperNodes spawn per
  message and the nodes' persistent workers) is stopped by PID when it exits. ``flowertune-llm federation``
  runs it until Ctrl-C.

Facts from flwr 1.41's source that shape this module:

* SuperNode authentication is registration first: with ``--enable-supernode-auth`` the SuperLink refuses
  the Fleet API's self-registration, so ``flwr supernode register KEY.pub CONNECTION`` (Control API) must
  create the node, and its node id, *before* the SuperNode's ``ActivateNode`` finds it by public key. An
  unregistered key is refused and ``flower-supernode`` exits. Authentication also requires TLS: a SuperNode
  with ``--insecure`` and a private key refuses to start.
* ``flower-superlink`` starts its ``flower-superexec`` in a new session (``start_new_session=True``), which
  starts one ``flwr-serverapp`` per run. ``flower-supernode`` starts its ``flower-superexec`` and that one
  ``flwr-clientapp`` per message with a plain ``Popen``: they stay in the SuperNode's session. So processes
  are found in /proc by a marker in their environment (inherited by everything below the process we
  start) and by the sessions the marked ones live in (see :class:`ProcessTracker`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowertune_llm.checkpoint import write_atomic

log = logging.getLogger(__name__)

DEFAULT_SANS = ("127.0.0.1", "localhost")
DEFAULT_CONNECTION = "local-deployment"
# Set only in the environment of the processes we start; inherited by everything they start.
MARKER_VAR = "FLOWERTUNE_LLM_PROCESS_TOKEN"
BIN_DIR = Path(sys.executable).parent  # where pip put flwr's console scripts


class FederationError(RuntimeError):
    """A Flower process or `flwr` CLI call of the local federation misbehaved."""


# --------------------------------------------------------------------------------------------------------
# TLS certificates


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path  # give this to SuperNodes (--root-certificates) and to the CLI (root-certificates)
    ca_key: Path  # keep it private: it can issue certificates every node trusts
    server_cert: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        return [
            "--ssl-ca-certfile",
            str(self.ca_cert),
            "--ssl-certfile",
            str(self.server_cert),
            "--ssl-keyfile",
            str(self.server_key),
        ]


def _san(name: str) -> Any:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_certificates(
    directory: Path,
    sans: Iterable[str] = (),
    days: int = 365,
    new_ca: bool = False,
) -> Certificates:
    """Write ``ca.crt``/``ca.key`` and ``server.pem``/``server.key`` into ``directory``.

    The server certificate's SANs are 127.0.0.1, localhost and ``sans`` (IP addresses or DNS names): every
    address a SuperNode or the CLI uses to reach the SuperLink must be among them. An existing CA in
    ``directory`` is reused unless ``new_ca``, so re-issuing the server certificate (say, for a new SAN)
    does not invalidate the ``ca.crt`` already handed to the nodes. Keys are ECDSA P-256, written 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    certs = Certificates(directory / "ca.crt", directory / "ca.key", directory / "server.pem", directory / "server.key")
    names = list(dict.fromkeys([*DEFAULT_SANS, *sans]))
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)  # tolerate clock skew
    not_after = now + datetime.timedelta(days=days)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    if not new_ca and certs.ca_cert.is_file() and certs.ca_key.is_file():
        ca_cert = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowertune-llm federation CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=max(days, 3650)))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_atomic(certs.ca_key, pem_key(ca_key), 0o600)
        write_atomic(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    write_atomic(certs.server_key, pem_key(server_key), 0o600)
    write_atomic(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return certs


# --------------------------------------------------------------------------------------------------------
# SuperNode authentication keys


@dataclass(frozen=True)
class SuperNodeKey:
    private: Path  # flower-supernode --auth-supernode-private-key
    public: Path  # flwr supernode register <public> <connection>


def make_supernode_key(directory: Path, name: str) -> SuperNodeKey:
    """An ECDSA P-384 key pair: ``<name>`` (OpenSSH private key, 0600) and ``<name>.pub`` (OpenSSH line).

    Flower accepts NIST curves only (ed25519 is refused). Same formats as ``ssh-keygen -t ecdsa -b 384``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' and '-' only")
    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pair = SuperNodeKey(directory / name, directory / f"{name}.pub")
    write_atomic(pair.private, private, 0o600)
    write_atomic(pair.public, public + f" {name}\n".encode())
    return pair


# --------------------------------------------------------------------------------------------------------
# Processes: find everything we started, also once orphaned, and stop it by PID


def proc_table() -> Iterator[tuple[int, int, bytes]]:
    """(pid, session id, environ) of every live, readable, non-zombie process but this one."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        # Fields after "(comm)": state, ppid, pgrp, session, ...; comm may hold spaces.
        state, _ppid, _pgrp, sid = stat.rsplit(")", 1)[1].split()[:4]
        if state != "Z":  # a zombie has exited already; its parent reaps it
            yield int(entry.name), int(sid), environ


class ProcessTracker:
    """The processes started with :meth:`env` in their environment and everything they started, even orphaned.

    A process is ours if its environment carries ``var=token`` (inherited by all descendants that keep
    their environment) or if it lives in a session one of those lives in: Ray workers that set their title
    (``ray::DashboardAgent``) blank their /proc/PID/environ but stay in the session. Sessions are
    remembered so members are still found after the marked leader is gone; Linux does not hand out a PID
    again while it still names a live session. The caller's own session is never ours: start what you
    track with ``start_new_session=True``.
    """

    def __init__(self, token: str | None = None, var: str = MARKER_VAR) -> None:
        self.var = var
        self.token = token or uuid.uuid4().hex
        self.needle = f"{var}={self.token}".encode()
        self.sids: set[int] = set()

    def env(self) -> dict[str, str]:
        return {self.var: self.token}

    def scan(self) -> set[int]:
        found, own_sid = set(), os.getsid(0)
        for pid, sid, environ in proc_table():
            if sid == own_sid:  # the caller's session: never ours to kill
                continue
            if self.needle in environ.split(b"\0"):
                self.sids.add(sid)
                found.add(pid)
            elif sid in self.sids:
                found.add(pid)
        return found


def signal_pids(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def terminate(
    tracker: ProcessTracker, procs: Sequence[subprocess.Popen[bytes]] = (), grace: float = 10, passes: int = 3
) -> set[int]:
    """SIGTERM every tracked process and ``procs``, SIGKILL what is left after ``grace`` s; return survivors.

    Several passes, because a parent may start a child (a ClientApp for a message in flight) while we kill.
    """

    def alive() -> set[int]:
        return tracker.scan() | {p.pid for p in procs if p.poll() is None}  # poll() also reaps our children

    for _ in range(passes):
        pids = alive()
        if not pids:
            break
        signal_pids(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while alive() & pids and time.monotonic() < deadline:
            time.sleep(0.1)
        if stubborn := alive() & pids:  # e.g. Ray agents ignore SIGTERM
            log.info("SIGKILL after %.0fs: %s", grace, sorted(stubborn))
            signal_pids(stubborn, signal.SIGKILL)
            time.sleep(0.2)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    return alive()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def exe(name: str) -> str:
    """A console script of this interpreter's installation (PATH may lack its bin directory)."""
    path = BIN_DIR / name
    return str(path) if path.exists() else name


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------------------
# The `flwr` CLI's connection


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
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(flwr_home) / "config.toml"
    if path.is_file():
        text = path.read_text()
    else:
        from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

        text = DEFAULT_FLOWER_CONFIG_TOML
    # Drop the old section (and sub-tables such as [superlink.<name>.options]) up to the next header.
    header = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")
    kept, skipping = [], False
    for line in text.splitlines():
        if match := header.match(line):
            table = match.group(1).replace('"', "")
            skipping = table == f"superlink.{name}" or table.startswith(f"superlink.{name}.")
        if not skipping:
            kept.append(line)
    text = "\n".join(kept).rstrip() + "\n"
    if make_default:
        parsed = tomllib.loads(text)
        if "default" in parsed.get("superlink", {}):
            text = re.sub(r"(?m)^(\s*default\s*=\s*).*$", rf'\g<1>"{name}"', text, count=1)
        elif "[superlink]" in text:
            text = text.replace("[superlink]", f'[superlink]\ndefault = "{name}"', 1)
        else:
            text = f'[superlink]\ndefault = "{name}"\n\n' + text
    # JSON string escapes are valid TOML basic-string escapes.
    section = f"\n[superlink.{name}]\naddress = {json.dumps(address)}\n"
    section += (
        f"root-certificates = {json.dumps(str(root_certificates))}\n" if root_certificates else "insecure = true\n"
    )
    text += section
    tomllib.loads(text)  # never leave a file the CLI cannot read
    return write_atomic(path, text.encode())


# --------------------------------------------------------------------------------------------------------
# A local federation: one SuperLink and N SuperNodes on 127.0.0.1


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
        self._started = False

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
        if left and check:
            raise FederationError(f"processes survived teardown: {sorted(left)}")
        return left

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

    def run_command(self, app: str = ".") -> str:
        """The exact command that runs ``app`` on this federation, with its logs streamed."""
        prefix = ""
        if self.cli_home != _default_flwr_home():
            prefix = f"FLWR_HOME={shlex.quote(str(self.cli_home))} "
        return f"{prefix}flwr run {shlex.quote(app)} {self.connection} --stream"


def _default_flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser().resolve()


# --------------------------------------------------------------------------------------------------------
# `flowertune-llm federation | certs | keys`


def add_federation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--supernodes", type=int, help="how many SuperNodes (default: one per --node-config, else 2)")
    parser.add_argument(
        "--tls", action="store_true", help="TLS on every SuperLink API, with a CA made in WORKDIR/certs"
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="SuperNode authentication (implies --tls): keys in WORKDIR/keys, registered with `flwr supernode register`",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="certificates, keys, logs and working directories (default: a new temporary directory)",
    )
    parser.add_argument(
        "--node-config",
        action="append",
        metavar="TEXT",
        help="a SuperNode's --node-config, once per SuperNode in order (default: partition-id=i num-partitions=N), e.g. \"dataset-path='/data/mine.jsonl'\"",
    )
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="another IP address or DNS name for the server certificate (127.0.0.1 and localhost are always in)",
    )
    parser.add_argument("--port", type=int, help="the SuperLink's port (default: a free one)")
    parser.add_argument(
        "--connection",
        default=DEFAULT_CONNECTION,
        help=f"name of the `flwr` CLI connection (default: {DEFAULT_CONNECTION})",
    )
    parser.add_argument(
        "--cli-home", type=Path, help="FLWR_HOME whose config.toml gets the connection (default: $FLWR_HOME or ~/.flwr)"
    )


def run_federation(args: argparse.Namespace) -> int:
    configs = args.node_config or None
    num = args.supernodes or (len(configs) if configs else 2)
    if configs and len(configs) != num:
        print(f"error: {len(configs)} --node-config for {num} SuperNodes", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flowertune-federation-"))
    federation = LocalFederation(
        workdir,
        num,
        tls=args.tls or args.auth,
        auth=args.auth,
        node_configs=configs,
        sans=args.san,
        connection=args.connection,
        cli_home=args.cli_home or _default_flwr_home(),
        make_default=False,
        port=args.port,
    )

    def stop_on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: a background job inherits it ignored
        signal.signal(sig, stop_on_signal)
    print(f"Starting a SuperLink and {num} SuperNode(s) in {federation.workdir} ...", flush=True)
    code = 0
    try:
        with federation:
            _print_federation(federation)
            code = _watch(federation)
    except KeyboardInterrupt:
        pass
    except FederationError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    if left := federation.pids():
        print(f"warning: still running: {sorted(left)}", file=sys.stderr)
        return code or 1
    print("Stopped every process of the federation.", flush=True)
    return code


def _print_federation(federation: LocalFederation) -> None:
    security = "TLS" if federation.tls else "insecure (no TLS)"
    if federation.auth:
        security += ", SuperNode authentication"
    lines = [f"SuperLink {federation.address}: {security}; log {federation.superlink_log}"]
    if federation.certificates:
        lines.append(f"  CA certificate (give it to SuperNodes and the CLI): {federation.certificates.ca_cert}")
    for node in federation.supernodes:
        lines.append(f'  {node.name}: node {node.node_id}, --node-config "{node.node_config}"; log {node.log_path}')
    threads = federation.supernode_environment()["OMP_NUM_THREADS"]
    lines += [
        f"ClientApps run with OMP_NUM_THREADS={threads} (set OMP_NUM_THREADS to change it).",
        f"Connection `{federation.connection}` is in {federation.cli_home / 'config.toml'}.",
        f"The ServerApp runs in {federation.superlink_dir}: a relative output.dir lands there.",
        "Run the app from its directory:",
        f"  {federation.run_command()}",
        "Ctrl-C stops every process of the federation.",
    ]
    print("\n".join(lines), flush=True)


def _watch(federation: LocalFederation) -> int:
    reported: set[str] = set()
    while True:
        time.sleep(1)
        assert federation.superlink is not None
        if federation.superlink.poll() is not None:
            print(
                f"The SuperLink exited with {federation.superlink.returncode}:\n{federation.superlink_tail()}",
                file=sys.stderr,
            )
            return 1
        for node in federation.supernodes:
            if node.name not in reported and node.proc.poll() is not None:
                reported.add(node.name)
                print(
                    f"{node.name} exited with {node.proc.returncode}:\n{tail(node.log_text(), 15)}",
                    file=sys.stderr,
                    flush=True,
                )


def add_certs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("certs"),
        help="where to write ca.crt, ca.key, server.pem, server.key (default: ./certs)",
    )
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="an IP address or DNS name SuperNodes and the CLI use to reach the SuperLink; repeat for more (127.0.0.1 and localhost are always in)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity of the server certificate (default: 365)")
    parser.add_argument(
        "--new-ca", action="store_true", help="make a new CA even if DIR has one (every node then needs the new ca.crt)"
    )


def run_certs(args: argparse.Namespace) -> int:
    reused = not args.new_ca and (args.dir / "ca.crt").is_file() and (args.dir / "ca.key").is_file()
    certs = make_certificates(args.dir, args.san, args.days, args.new_ca)
    names = ", ".join(dict.fromkeys([*DEFAULT_SANS, *args.san]))
    print(f"{'Reused' if reused else 'New'} CA: {certs.ca_cert} (key {certs.ca_key}, keep it private)")
    print(f"Server certificate for {names}: {certs.server_cert} (key {certs.server_key})")
    print("SuperLink flags:  " + shlex.join(certs.superlink_args()))
    print(f"SuperNode flag:   --root-certificates {shlex.quote(str(certs.ca_cert.resolve()))}")
    print(f'CLI connection:   root-certificates = "{certs.ca_cert.resolve()}"')
    return 0


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="one key pair per name: NAME (private) and NAME.pub")
    parser.add_argument("--dir", type=Path, default=Path("keys"), help="where to write them (default: ./keys)")


def run_keys(args: argparse.Namespace) -> int:
    for name in args.names:
        try:
            pair = make_supernode_key(args.dir, name)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{name}: private {pair.private} (0600, stays on the SuperNode), public {pair.public}")
        print(f"  register:  flwr supernode register {shlex.quote(str(pair.public))} <connection>")
        print(f"  SuperNode: --auth-supernode-private-key {shlex.quote(str(pair.private.resolve()))}")
    return 0


COMMANDS = {
    "federation": (
        "run a SuperLink and SuperNodes on 127.0.0.1 until Ctrl-C",
        add_federation_arguments,
        run_federation,
    ),
    "certs": ("make a CA and a SuperLink TLS certificate", add_certs_arguments, run_certs),
    "keys": ("make SuperNode authentication keys (ECDSA P-384)", add_keys_arguments, run_keys),
}


def add_commands(commands: Any) -> dict[str, Any]:
    """Add ``federation``, ``certs`` and ``keys`` to an argparse subparsers object; return their handlers."""
    handlers = {}
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
        handlers[name] = run
    return handlers
