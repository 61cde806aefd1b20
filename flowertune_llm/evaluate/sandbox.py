"""Running generated programs: each in its own empty directory, with limits, no network, nothing written outside.

Where the kernel allows unprivileged user namespaces (most Linux systems, and this project's CI), a
program runs under ``unshare --user --net --mount --pid`` and jail.py:

* **no network**: a new network namespace has only a loopback interface, and it is down;
* **nothing written outside its directory**: every mount is read-only in its mount namespace except the
  program's own temporary directory (``HOME`` and ``TMPDIR`` point there);
* **children killed**: the program is PID 1's child in a new PID namespace; when the time is up, or the
  program ends, the namespace's init dies and the kernel kills everything in it, daemons included;
* **limits**: address space (``memory_mb``), file size, processes (a fork bomb hits ``RLIMIT_NPROC``,
  which holds in a user namespace, and dies with the namespace), wall time.

Without namespaces (:func:`isolation` says ``"limits"``), programs run with the same limits in a new
session whose process group is killed, but with the network and the filesystem of the user: the results
file records which isolation was used. The bigcode harness the leaderboard uses runs Python in a process
with some functions disabled (``reliability_guard``) and JS/C++ with no isolation at all.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

JAIL = Path(__file__).with_name("jail.py")
_UNSHARE = ("unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child")


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


def _limited(limits: Limits) -> None:  # preexec_fn of the "limits" fallback
    mib = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(argv: list[str], workdir: Path, limits: Limits, *, tail: int = 2000) -> Outcome:
    """Run ``argv`` in ``workdir`` (which it may write) within ``limits``; never raises for what the program does."""
    workdir = Path(workdir).resolve()
    log_path = workdir.parent / f"{workdir.name}.out"  # outside the program's reach, written through its own fd
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
    if isolation() == "namespaces":
        argv = [*_UNSHARE, sys.executable, "-I", "-S", str(JAIL), str(workdir), str(limits.memory_mb),
                str(limits.processes), str(limits.file_mb), "--", *argv]  # fmt: skip
        preexec = None
    else:
        preexec = functools.partial(_limited, limits)
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True, preexec_fn=preexec)  # fmt: skip
        try:
            returncode: int | None = process.wait(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _kill_group(process)
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
