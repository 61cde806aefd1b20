"""Finding every process a launcher started, also once orphaned, and stopping each by PID.

``flower-superlink`` starts its ``flower-superexec`` in a new session (``start_new_session=True``), which
starts one ``flwr-serverapp`` or ``flwr-simulation`` (and Ray) per run; ``flower-supernode`` starts its
``flower-superexec`` and that one ``flwr-clientapp`` per message with a plain ``Popen``. So processes are
found in /proc by a marker in their environment (inherited by everything below the process we start) and
by the sessions the marked ones live in (:class:`ProcessTracker`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# Set only in the environment of the processes we start; inherited by everything they start.
MARKER_VAR = "FLOWERTUNE_LLM_PROCESS_TOKEN"
BIN_DIR = Path(sys.executable).parent  # where pip put flwr's console scripts


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
