"""``flowertune-llm run``: ``flwr run --stream`` without Flower's traps for a first run.

``flwr run`` (Flower 1.42) submits first and checks later: a bad key surfaces after Ray has started, at the
bottom of a long traceback (an unknown one as ``[code: 15] Invalid run configuration.`` without its name);
it exits 0 whatever became of the run; Ctrl-C only stops the streaming, and the run goes on; and one ``flwr``
command typed before ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` was exported leaves a local
SuperLink that tries to ``uv sync`` the app's dependencies for every later run (fails offline, Exit Code
608). This command, with the same arguments as ``flwr run``:

1. parses the run config as the app will (defaults < preset < overrides) and stops on a bad one in about a
   second, with one line naming the key and exit status 2;
2. for a local connection (``address = ":local:"``), makes sure the SuperLink it talks to installs nothing:
   it restarts one of this ``FLWR_HOME`` that would, and says so;
3. runs ``flwr run --stream`` with the installation turned off for any SuperLink it starts;
4. on Ctrl-C or SIGTERM stops the run (``flwr stop``), not just the streaming;
5. prints the run directory, and exits 0 only when the run completed (``flwr ls --run-id``): 1 when it failed,
   130 when it was stopped here, 1 when it was stopped elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DISABLE_INSTALL = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
_STARTED = re.compile(r"Successfully started run (\d+)")
EXIT_BAD_CONFIG, EXIT_FAILED, EXIT_STOPPED = 2, 1, 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app_dir", nargs="?", default=".", help="the app (default: the current directory)")
    parser.add_argument("connection", nargs="?", help="a SuperLink connection of $FLWR_HOME/config.toml (default: its default)")
    parser.add_argument("--run-config", action="append", help="as for flwr run: \"key=value ...\" or a TOML file")
    parser.add_argument("--federation-config", action="append", help="as for flwr run, e.g. \"num-supernodes=4\"")


def resolve_run_config(run_config: list[str] | None, preset: str | None = None) -> dict:
    """The flat run config ``flwr run`` would hand the app: pyproject defaults, the overrides parsed by Flower's
    own parser (so quoting and TOML files behave the same); ``preset`` (if given) set on top. Raises
    ConfigError naming the key for an unknown one, and ValueError for what Flower cannot parse."""
    import click
    from flwr.common.config import parse_config_args

    from flowertune_llm.config import ConfigError, default_run_config

    try:
        overrides = parse_config_args(run_config)
    except click.ClickException as error:
        raise ValueError(f"--run-config: {error.format_message().strip().splitlines()[0]}") from None
    except ValueError as error:  # e.g. a TOML file next to key=value pairs
        raise ValueError(f"--run-config: {str(error).strip().splitlines()[0]}") from None
    defaults = default_run_config()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(unknown[0], overrides[unknown[0]], "unknown key (README, Configuration, lists them)")
    flat = {**defaults, **overrides}
    if preset:
        flat["preset"] = preset
    return flat


def run(args: argparse.Namespace) -> int:
    from flowertune_llm.config import parse_run_config

    started = time.monotonic()
    try:
        config = parse_run_config(resolve_run_config(args.run_config))
    except (ValueError, OSError) as error:  # ConfigError is a ValueError naming the key
        print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    rounds = f"{config.num_server_rounds} round{'' if config.num_server_rounds == 1 else 's'}"
    print(f"Run config checked ({time.monotonic() - started:.1f} s): {rounds} of "
          f"{config.model.name}, output under {config.output.root}", file=sys.stderr)  # fmt: skip
    try:
        _ensure_local_superlink_installs_nothing(args.connection)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    command = [_flwr(), "run", args.app_dir, *([args.connection] if args.connection else []), "--stream"]
    for value in args.run_config or []:
        command += ["--run-config", value]
    for value in args.federation_config or []:
        command += ["--federation-config", value]
    watch = _Watch(command, {**os.environ, DISABLE_INSTALL: "1"})
    stopped_here = watch.run(lambda run_id: _flwr_quiet("stop", str(run_id), *_connection(args)))
    if watch.run_id is None:
        return watch.returncode or EXIT_FAILED  # flwr refused the submission and said why
    status = _status(watch.run_id, args)
    run_dir = config.output.root / str(watch.run_id)
    if run_dir.is_dir():
        print(f"Run directory: {run_dir}", file=sys.stderr)
    print(f"Run {watch.run_id}: {status}", file=sys.stderr)
    if status == "finished:completed":
        return 0
    return EXIT_STOPPED if stopped_here else EXIT_FAILED


class _Watch:
    """``flwr run --stream`` in a session of its own, its output passed through, its run id noted; a Ctrl-C
    or SIGTERM here stops the run (``on_stop(run_id)``) and then the streaming."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.command, self.env = command, env
        self.run_id: int | None = None
        self.returncode: int | None = None
        self._stop = threading.Event()

    def run(self, on_stop) -> bool:
        previous = {sig: signal.signal(sig, lambda *_: self._stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            # A session of its own: the terminal's Ctrl-C reaches this process only, which stops the run first.
            process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, bufsize=1, start_new_session=True)  # fmt: skip
            reader = threading.Thread(target=self._relay, args=(process,), daemon=True)
            reader.start()
            while process.poll() is None and not self._stop.is_set():
                time.sleep(0.1)
            if self._stop.is_set():
                print("\nStopping the run ...", file=sys.stderr, flush=True)
                deadline = time.monotonic() + 30
                while self.run_id is None and process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)  # submitted but not yet acknowledged: wait for its id
                if self.run_id is not None:
                    on_stop(self.run_id)
                try:
                    process.wait(timeout=30)  # the stream closes once the run has stopped
                except subprocess.TimeoutExpired:
                    process.terminate()
                    process.wait(timeout=10)
            reader.join(timeout=5)
            self.returncode = process.returncode
            return self._stop.is_set()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _relay(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            found = _STARTED.search(line)
            if found and self.run_id is None:
                self.run_id = int(found.group(1))


def _flwr() -> str:
    here = Path(sys.executable).parent / "flwr"
    return str(here) if here.exists() else "flwr"


def _connection(args: argparse.Namespace) -> list[str]:
    return [args.connection] if args.connection else []


def _flwr_quiet(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_flwr(), *arguments], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, DISABLE_INSTALL: "1"})  # fmt: skip


def _status(run_id: int, args: argparse.Namespace) -> str:
    """The run's status as the SuperLink reports it (``finished:completed``, ``finished:failed``, ...)."""
    for _ in range(50):  # the status lands a moment after the stream closes
        listed = _flwr_quiet("ls", *_connection(args), "--run-id", str(run_id), "--format", "json")
        try:
            status = json.loads(listed.stdout)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            return f"unknown (flwr ls: {(listed.stdout + listed.stderr).strip()[:200]})"
        if status.startswith("finished"):
            return status
        time.sleep(0.2)
    return status


# --- the local SuperLink ---------------------------------------------------------------------------------------


def _ensure_local_superlink_installs_nothing(connection_name: str | None) -> None:
    """For a local connection: a running local SuperLink of this FLWR_HOME that would install the app's
    dependencies for every run is stopped (the ``flwr run`` that follows starts one that does not)."""
    import click
    from flwr.cli.constant import LOCAL_SUPERLINK_HTTP_API_PORT
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.supercore.utils import get_flwr_home

    try:
        connection = read_superlink_connection(connection_name)
    except click.ClickException as error:
        raise RuntimeError(error.format_message().strip().splitlines()[0]) from None
    if connection.address not in (":local:", ":local-in-memory:"):
        return  # a SuperLink someone started: its flags are theirs (README says which one it needs)
    for pid, cmdline, environ in _superlinks_on(LOCAL_SUPERLINK_HTTP_API_PORT):
        home = Path(environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser().resolve()
        if home != Path(get_flwr_home()).expanduser().resolve():
            raise RuntimeError(f"the local SuperLink on 127.0.0.1:{LOCAL_SUPERLINK_HTTP_API_PORT} (pid {pid}) belongs to "
                               f"FLWR_HOME={home}; stop it, or run with that FLWR_HOME")  # fmt: skip
        if environ.get(DISABLE_INSTALL) == "1" or "--disable-runtime-dependency-installation" in cmdline:
            return
        print(f"The local SuperLink (pid {pid}) was started without {DISABLE_INSTALL}=1: it would install the app's "
              "dependencies for every run (slow with torch, failing offline). Restarting it without.", file=sys.stderr)  # fmt: skip
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (an exited process that its parent has not yet reaped counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _superlinks_on(port: str) -> list[tuple[int, list[str], dict[str, str]]]:
    """``flower-superlink`` processes serving ``--port port`` (Linux /proc; elsewhere none are found)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if not any(part.endswith(b"flower-superlink") for part in cmdline[:2]):
                continue
            args = [part.decode() for part in cmdline if part]
            if "--port" not in args or args[args.index("--port") + 1] != str(port):
                continue
            environ = dict(
                item.decode().split("=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item
            )
        except (OSError, IndexError, ValueError):
            continue
        found.append((int(entry.name), args, environ))
    return found
