"""Everything a launcher started is found, also once orphaned, and stopped by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from flowertune_llm.deploy.processes import ProcessTracker, free_port, terminate

# A child that starts a grandchild ignoring SIGTERM, prints its PID and exits: the grandchild is orphaned.
ORPHAN_MAKER = """
import signal, subprocess, sys
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(grandchild.pid, flush=True)
"""


def test_an_orphan_that_ignores_sigterm_is_found_and_killed():
    tracker = ProcessTracker()
    child = subprocess.Popen([sys.executable, "-c", ORPHAN_MAKER], env={**os.environ, **tracker.env()},
                             stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    grandchild = int(child.stdout.readline())
    child.wait(timeout=30)
    try:
        assert grandchild in tracker.scan()  # found by the marker it inherited, its parent gone
        started = time.monotonic()
        assert terminate(tracker, grace=1) == set()
        assert time.monotonic() - started < 10
        assert grandchild not in tracker.scan()
    finally:
        try:
            os.kill(grandchild, 9)
        except ProcessLookupError:
            pass


def test_the_callers_own_session_is_never_ours():
    tracker = ProcessTracker()
    same_session = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env={**os.environ, **tracker.env()})
    try:
        assert same_session.pid not in tracker.scan()
    finally:
        same_session.kill()
        same_session.wait()


def test_free_ports_are_free():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
