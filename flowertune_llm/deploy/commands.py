"""``flowertune-llm federation | certs | keys``: the deployment tools on the command line."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flowertune_llm.deploy.certificates import DEFAULT_SANS, make_certificates, make_supernode_key
from flowertune_llm.deploy.cli_config import default_flwr_home
from flowertune_llm.deploy.federation import DEFAULT_CONNECTION, FederationError, LocalFederation
from flowertune_llm.deploy.processes import tail


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
        cli_home=args.cli_home or default_flwr_home(),
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
        f"Connection `{federation.connection}` is in {federation.cli_home / 'config.toml'} until the federation stops.",
        f"The ServerApp runs in {federation.superlink_dir}: a relative output.dir lands there.",
        "Run the quickstart from the app's directory (offline; `flwr run . <connection> --stream` works too):",
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
