"""A SuperNode's persistent worker: keeps the model loaded across rounds in the Deployment Engine.

Flower's Deployment Engine starts a fresh ClientApp process for every message, so a ClientApp that trains
in-process would import torch and load the base model again every round (simulation keeps its actors, and
the model, for the whole run). Here the ClientApp stays light: it hands the round to a worker process of
its node, started on first use, that imports the training stack once and keeps the model cache
(training/models.py's cached_peft_model) warm. The two talk over a Unix socket guarded by a random key only the node's
user can read.

The worker stops when its SuperNode's SuperExec (the ClientApp's parent) exits, after ``--idle-timeout`` seconds without work, or on SIGTERM.
A worker is tied to one version of this package's code (its socket name carries a hash of it), so a new
app version starts a new worker instead of talking to stale code.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from flwr.app import Context, RecordDict

from flowertune_llm.config import NodeConfig
from flowertune_llm.observe.profiling import Profiler

log = logging.getLogger(f"flwr.{__name__}")

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # flowertune_llm/
START_TIMEOUT = 600  # seconds: imports and a first model load on a slow disk
IDLE_TIMEOUT = 3600


class WorkerError(RuntimeError):
    """The worker failed the round; the message is the worker's error, which Flower relays to the server."""


def in_simulation() -> bool:
    # Simulation runs ClientApps in Ray actors that live for the whole run: no worker needed there.
    return "ray" in sys.modules


def wanted(node: NodeConfig) -> bool:
    """A node operator may force it with ``--node-config "persistent-worker=false"``; by default, outside simulation."""
    return not in_simulation() if node.persistent_worker is None else node.persistent_worker


def _code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class WorkerPaths:
    socket: Path
    key: Path
    lock: Path
    log: Path
    pid: Path

    @classmethod
    def for_node(cls, node_id: int) -> WorkerPaths:
        root = Path(os.environ.get("FLOWERTUNE_LLM_WORKER_DIR", "~/.cache/flowertune-llm/workers")).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        stem = root / f"node-{node_id}-{_code_hash()}"
        return cls(*(stem.with_suffix(suffix) for suffix in (".sock", ".key", ".lock", ".log", ".pid")))


def handle(message_type: str, content: RecordDict, context: Context, node: NodeConfig, profile: Profiler) -> RecordDict:
    """Hand one message to the node's worker (starting it if needed) and return its reply content.

    The run config goes as Flower gave it: the worker parses it once per run (config.run_config_of), where
    this process, new for every message, would parse it every time.
    """
    paths = WorkerPaths.for_node(context.node_id)
    request = {
        "message_type": message_type,
        "content": content,
        "run_id": context.run_id,
        "node_id": context.node_id,
        "run_config": dict(context.run_config),
        "node_config": node,
        "profile": profile.enabled,
    }
    with profile.span("worker_connect") as span:
        connection, span["started_worker"] = _connect(paths)
    with connection:
        try:
            connection.send(request)
            response = connection.recv()
        except (EOFError, OSError) as error:
            raise WorkerError(f"the worker died during the round ({error!r}); see {paths.log}") from None
    if "error" in response:
        raise WorkerError(f"{response['error']} (worker log: {paths.log})")
    for event in response["events"]:  # the worker's own spans, nested under this handler
        profile.emit({**event, "parent": event.get("parent") or "handler"})
    return response["content"]


def _try_connect(paths: WorkerPaths) -> Connection | None:
    try:
        return Client(str(paths.socket), family="AF_UNIX", authkey=paths.key.read_bytes())
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def _connect(paths: WorkerPaths) -> tuple[Connection, bool]:
    if (connection := _try_connect(paths)) is not None:
        return connection, False
    # Two ClientApps of one node may arrive together: one starts the worker, the other waits for it.
    with paths.lock.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (connection := _try_connect(paths)) is not None:
            return connection, False
        process = _spawn(paths)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if (connection := _try_connect(paths)) is not None:
                return connection, True
            if process.poll() is not None:
                raise WorkerError(f"the worker exited with {process.returncode}:\n{_tail(paths.log)}")
            time.sleep(0.2)
    raise WorkerError(f"the worker did not start within {START_TIMEOUT}s; see {paths.log}")


def _spawn(paths: WorkerPaths) -> subprocess.Popen:
    paths.socket.unlink(missing_ok=True)
    scratch = paths.key.with_suffix(".key.tmp")
    scratch.write_bytes(os.urandom(32))
    scratch.chmod(0o600)
    os.replace(scratch, paths.key)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    log.info("Starting this node's persistent worker (log: %s)", paths.log)
    with paths.log.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "flowertune_llm.deploy.worker", "--socket", str(paths.socket), "--key", str(paths.key),
             "--watch-pid", str(os.getppid()), "--idle-timeout", str(IDLE_TIMEOUT)],  # parent: the node's SuperExec
            env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this ClientApp process, which exits after the round
        )  # fmt: skip


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def serve(socket: Path, key: Path, watch_pid: int, idle_timeout: float) -> None:
    last_used = [time.monotonic()]
    busy = threading.Event()

    def watchdog() -> None:
        while True:
            time.sleep(2)
            parent_gone = watch_pid > 0 and not _alive(watch_pid)
            idle = not busy.is_set() and time.monotonic() - last_used[0] > idle_timeout
            if parent_gone or idle:
                print(f"worker exiting: {'the SuperNode is gone' if parent_gone else 'idle'}", flush=True)
                socket.unlink(missing_ok=True)
                socket.with_suffix(".pid").unlink(missing_ok=True)
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    # The training stack: the imports this worker exists to pay once.
    from flowertune_llm.config import run_config_of
    from flowertune_llm.federated.client_round import NodeRound, handle
    from flowertune_llm.observe.profiling import OFF, Recorder, reset_gpu_peak

    listener = Listener(str(socket), family="AF_UNIX", authkey=key.read_bytes())
    socket.with_suffix(".pid").write_text(str(os.getpid()))
    print(f"worker {os.getpid()} ready on {socket}", flush=True)
    while True:
        try:
            connection = listener.accept()
        except (OSError, EOFError, AuthenticationError) as error:  # a caller without the key, or one that left
            print(f"refused a connection: {error!r}", flush=True)
            continue
        busy.set()
        with connection:
            try:
                request = connection.recv()
                profile = Recorder(node=request["node_id"]) if request["profile"] else OFF
                if profile.enabled:
                    reset_gpu_peak()  # this round's GPU peak: the worker, not the ClientApp, holds the model
                run = run_config_of(request["run_id"], request["run_config"])
                node_round = NodeRound(request["run_id"], request["node_id"], run, request["node_config"])
                content = handle(request["message_type"], request["content"], node_round, profile)
                profile.memory("worker")  # what the node's training process holds: what to size a node by
                response = {"content": content, "events": profile.events}
            except Exception as error:  # noqa: BLE001 - every failure goes back to the ClientApp, named
                traceback.print_exc()
                response = {"error": f"{type(error).__name__}: {error}"}
            try:
                connection.send(response)
            except (OSError, EOFError) as error:
                print(f"the ClientApp went away before the reply: {error!r}", flush=True)
        last_used[0] = time.monotonic()
        busy.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description="a SuperNode's persistent flowertune-llm worker")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument(
        "--watch-pid", type=int, default=0, help="exit when this process (the node's SuperExec) exits"
    )
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT)
    args = parser.parse_args()
    serve(args.socket, args.key, args.watch_pid, args.idle_timeout)


if __name__ == "__main__":
    main()
