"""Inside a sandbox's namespaces, before the program runs: make every mount read-only but the work directory,
set the resource limits, and exec the program.

Started by sandbox.py as ``[setpriv --reuid=nobody] unshare --user --map-root-user --net --mount --pid --fork
--mount-proc python -I -S jail.py WORKDIR MEMORY_MB PROCESSES FILE_MB -- PROGRAM...``; standalone on purpose
(no package import, so it starts in a few milliseconds). Being root in a new user namespace grants nothing
outside it: the mounts made read-only here are this namespace's view. PROCESSES is the RLIMIT_NPROC value,
counted by the caller on the host (this namespace's /proc shows only its own processes).
"""

import ctypes
import ctypes.util
import os
import resource
import sys

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
# Per-mount flags a remount must repeat, or the kernel refuses to change a mount it locked.
_KEPT = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
         "relatime": 1 << 21}  # fmt: skip


def _mount(source: str, target: str, flags: int) -> int:
    return _libc.mount(source.encode(), target.encode(), None, flags, None)


def _mounts() -> list[tuple[str, int]]:
    """(mount point, its per-mount flags), deepest first."""
    found = {}
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            found[point] = sum(_KEPT.get(option, 0) for option in fields[5].split(","))
    return sorted(found.items(), key=lambda item: len(item[0]), reverse=True)


def _read_only_except(workdir: str) -> None:
    # The work directory becomes its own mount first, so making its parent read-only leaves it writable.
    if _mount(workdir, workdir, MS_BIND) != 0:
        raise OSError(ctypes.get_errno(), f"cannot bind {workdir}")
    for point, flags in _mounts():
        if point == workdir or point == "/proc" or point.startswith("/proc/") or point in ("/dev", "/dev/pts"):
            continue
        # A mount the kernel will not change (locked by the parent namespace) stays as it was: no more
        # writable than outside, where this process had no right to write it either.
        _mount("none", point, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)


def main() -> None:
    workdir, memory_mb, processes, file_mb, separator, *program = sys.argv[1:]
    if separator != "--" or not program:
        raise SystemExit("usage: jail.py WORKDIR MEMORY_MB PROCESSES FILE_MB -- PROGRAM...")
    _read_only_except(workdir)
    os.chdir(workdir)
    mib = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (int(memory_mb) * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(file_mb) * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (int(processes), int(processes)))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    os.execvpe(program[0], program, env)


if __name__ == "__main__":
    main()
