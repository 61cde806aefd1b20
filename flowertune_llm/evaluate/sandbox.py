"""Running generated programs: each in its own empty directory, with limits, no network, nothing written outside.

Where the kernel allows unprivileged user namespaces (most Linux systems, and this project's CI), a
program runs under ``unshare --user --net --mount --pid`` and jail.py:

* **no network**: a new network namespace has only a loopback interface, and it is down;
* **nothing written outside its directory**: every mount is read-only in its mount namespace except the
  program's own temporary directory (``HOME`` and ``TMPDIR`` point there);
* **children killed**: the program is PID 1's child in a new PID namespace; when the time is up, or the
  program ends, the namespace's init dies and the kernel kills everything in it, daemons included;
* **limits**: address space (``memory_mb``), file size, processes, wall time. A fork bomb hits its process
  limit, then dies with the namespace. The kernel never applies ``RLIMIT_NPROC`` to root, so as root the
  limit is a ``pids`` cgroup made for the program (cgroup v1 or v2); for anyone else, ``RLIMIT_NPROC``
  over what the user already runs. :func:`process_limit` says which.

Without namespaces (:func:`isolation` says ``"limits"``), programs run with the same limits in a new
session whose process group is killed, but with the network and the filesystem of the user: the results
file records which isolation was used. The bigcode harness the leaderboard uses runs Python in a process
with some functions disabled (``reliability_guard``) and JS/C++ with no isolation at all.
"""

from __future__ import annotations

import functools
import itertools
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

JAIL = Path(__file__).with_name("jail.py")
_UNSHARE = ("unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child")
_PIDS_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))  # cgroup v1's pids hierarchy, v2's root


def _own_processes() -> int:
    count, uid = 0, os.getuid()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count


def _pids_root() -> Path | None:
    for root in _PIDS_ROOTS:
        if (root / "pids.max").exists() or "pids" in _read(root / "cgroup.subtree_control"):
            return root
    if (_PIDS_ROOTS[0] / "cgroup.procs").exists():  # v1's root has no pids.max of its own
        return _PIDS_ROOTS[0]
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@functools.cache
def process_limit() -> str:
    """How a program's processes are capped: ``"RLIMIT_NPROC"``, ``"pids cgroup"``, or ``"none"`` (root without a
    writable pids cgroup: the time limit and the PID namespace still end a fork bomb, after up to its seconds)."""
    if os.geteuid() != 0:
        return "RLIMIT_NPROC"
    root = _pids_root()
    if root is None:
        return "none"
    try:
        probe = root / f"flowertune-probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return "none"
    return "pids cgroup"


class _PidsGroup:
    """A pids cgroup for one program (as root): created before it starts, removed once it is gone."""

    def __init__(self, processes: int):
        root = _pids_root()
        assert root is not None
        self.path = root / f"flowertune-sandbox-{os.getpid()}-{next(_groups)}"
        self.path.mkdir()
        (self.path / "pids.max").write_text(str(processes))

    def join(self) -> None:  # in the child, before exec: it and everything it starts are counted
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        for _ in range(50):  # the kernel releases a cgroup once its last process is reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)


_groups = itertools.count()


@dataclass(frozen=True)
class Limits:
    seconds: float  # wall time
    memory_mb: int = 2048  # address space: V8 reserves much more than it uses, so not less than 1 GiB for node
    processes: int = 64
    file_mb: int = 64


@dataclass(frozen=True)
class Outcome:
    returncode: int | None  # None when killed at the time limit
    output: str  # the tail of what it printed (stdout and stderr)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@functools.cache
def isolation() -> str:
    """``"namespaces"`` when programs can run in their own user, network, mount and PID namespaces, else ``"limits"``."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return "limits"
    try:
        done = subprocess.run([*_UNSHARE, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "limits"
    return "namespaces" if done.returncode == 0 else "limits"


def _limited(limits: Limits, nproc: int) -> None:  # preexec_fn of the "limits" fallback
    mib = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _start(group: _PidsGroup | None, then) -> None:  # preexec_fn: join the pids cgroup first
    if group is not None:
        group.join()
    if then is not None:
        then()


def run(argv: list[str], workdir: Path, limits: Limits, *, tail: int = 2000) -> Outcome:
    """Run ``argv`` in ``workdir`` (which it may write) within ``limits``; never raises for what the program does."""
    workdir = Path(workdir).resolve()
    log_path = workdir.parent / f"{workdir.name}.out"  # outside the program's reach, written through its own fd
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
    # RLIMIT_NPROC counts every process of the user on the machine: what it runs now, plus the allowance.
    nproc = _own_processes() + limits.processes
    if isolation() == "namespaces":
        argv = [*_UNSHARE, sys.executable, "-I", "-S", str(JAIL), str(workdir), str(limits.memory_mb),
                str(nproc), str(limits.file_mb), "--", *argv]  # fmt: skip
        then = None
    else:
        then = functools.partial(_limited, limits, nproc)
    group = _PidsGroup(limits.processes + 4) if process_limit() == "pids cgroup" else None  # + unshare, the jail
    try:
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True, preexec_fn=functools.partial(_start, group, then))  # fmt: skip
            try:
                returncode: int | None = process.wait(timeout=limits.seconds)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(process)
    finally:
        if group is not None:
            group.remove()
    with log_path.open("rb") as log:
        log.seek(max(0, log_path.stat().st_size - tail))
        output = log.read().decode(errors="replace")
    log_path.unlink(missing_ok=True)
    return Outcome(returncode, output)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the session: unshare (and with it the namespace) or the program
    except ProcessLookupError:
        pass
    process.wait()
