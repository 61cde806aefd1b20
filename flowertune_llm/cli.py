"""The ``flowertune-llm`` command. Flower's CLI has no plugin hook, so our tools live here, not under ``flwr``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowertune_llm.deploy import commands as deploy_commands
from flowertune_llm.deploy import run_command
from flowertune_llm.evaluate import command as evaluate_command
from flowertune_llm.training.templates import CHAT_TEMPLATES


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peft-path", required=True, help="a checkpoint directory: <run dir>/checkpoints/round-N")
    parser.add_argument("--question", required=True)
    parser.add_argument("--template", default="vicuna_v1.1", choices=sorted(CHAT_TEMPLATES))
    parser.add_argument("--quantization", type=int, default=0, choices=(0, 4, 8))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")


def chat(args: argparse.Namespace) -> int:
    from flowertune_llm.training.adapters import AdapterError, check_adapter
    from flowertune_llm.training.inference import answer, load_adapter_model
    from flowertune_llm.training.templates import chat_template

    try:
        check_adapter(Path(args.peft_path), None)
    except (AdapterError, ValueError) as error:  # a truncated file is a ValueError naming it
        print(f"error: {error}", file=sys.stderr)
        return 2
    model, tokenizer = load_adapter_model(args.peft_path, args.quantization, args.dtype)
    print(answer(model, tokenizer, args.question, chat_template(args.template), args.max_new_tokens, args.temperature))
    return 0


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run id (looked up under the output directories) or a run directory")
    parser.add_argument(
        "--output-dir", action="append", default=[], type=Path, help="also look here (repeatable); "
        "the default output.dir is always searched"
    )  # fmt: skip
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--plot", type=Path, help="write a timeline and memory plot to this PNG")


def profile(args: argparse.Namespace) -> int:
    from flowertune_llm.config import OutputConfig, default_run_config
    from flowertune_llm.observe import report as profile_report

    default_dir = OutputConfig(default_run_config()["output.dir"]).root
    try:
        run_dir = profile_report.find_run(args.run, [*args.output_dir, default_dir])
    except profile_report.ProfileNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    loaded = profile_report.load_profile(run_dir / profile_report.PROFILE_FILE)
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    summary = profile_report.summarize(loaded.events)
    if args.format == "json":
        print(json.dumps({"run_dir": str(run_dir), **summary}, indent=2))
    else:
        print(f"Run {run_dir}\n")
        print(profile_report.format_tables(summary))
    if args.plot:
        print(f"Plot: {profile_report.plot(loaded.events, args.plot).resolve()}", file=sys.stderr)
    return 0


def add_partitions_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="a recipe under configs/, as preset='NAME' in --run-config")
    parser.add_argument(
        "--run-config", action="append", metavar="CONFIG",
        help='as `flwr run --run-config` takes it: "key=value key2=value2" or a TOML file',
    )  # fmt: skip
    parser.add_argument(
        "--federation-config", action="append", metavar="CONFIG",
        help="as `flwr run --federation-config` takes it; its num-supernodes is the number of nodes",
    )  # fmt: skip
    parser.add_argument(
        "--num-partitions", type=int,
        help="nodes to split among (default: num-supernodes of --federation-config, else of the default federation)",
    )  # fmt: skip
    parser.add_argument(
        "--labels", help="the column or derived label whose mix is shown (default: partition.by, else @first-word)"
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--plot", type=Path, help="write a stacked bar chart of each node's examples by label (PNG)")


def partitions_command(args: argparse.Namespace) -> int:
    """``flowertune-llm partitions``: each node's size and label mix, from the run config ``flwr run`` would use."""
    import click

    from flowertune_llm.config import parse_run_config
    from flowertune_llm.deploy.run_command import resolve_run_config
    from flowertune_llm.training import data, partitions

    try:
        config = parse_run_config(resolve_run_config(args.run_config, args.preset))
        num_partitions, source = _num_partitions(args)
        shown = args.labels or config.partition.by or "@first-word"
        federated = data.federated_dataset(config.dataset, config.partition, config.train.seed, num_partitions, shown)
        problem = partitions.labels_problem(federated.load_split(partitions.SPLIT), shown)
        if problem:
            raise ValueError(f"--labels '{shown}': {problem}")
        shares = partitions.node_shares(federated, num_partitions, shown)
    except click.ClickException as error:  # Flower's parser: a --federation-config string it cannot read
        print(f"error: --federation-config: {error.format_message().strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # ConfigError, a data file, a TOML file, a dataset not on the Hub
        print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    description = partitions.describe_partitioning(config.partition)
    total = sum(share.examples for share in shares)
    if args.format == "json":
        nodes = [{"node": s.node, "partition_id": s.partition_id, "examples": s.examples, "labels": s.labels}
                 for s in shares]  # fmt: skip
        print(json.dumps({"partitioning": description, "dataset": config.dataset.name, "format": config.dataset.format,
                          "seed": config.train.seed, "num_partitions": num_partitions, "num_partitions_from": source,
                          "examples": total, "labels": shown, "nodes": nodes}, indent=2))  # fmt: skip
    else:
        print(f"Partitioning: {description}")
        print(f"Data: {config.dataset.name} ({config.dataset.format}), {total} examples, "
              f"train.seed={config.train.seed}, {num_partitions} nodes ({source})")  # fmt: skip
        print(f"Labels: {shown}\n")
        print(_partitions_table(shares, total))
    if args.plot:
        title = f"{config.dataset.name}: {description}"
        print(f"Plot: {partitions.plot(shares, title, shown, args.plot).resolve()}", file=sys.stderr)
    return 0


def _num_partitions(args: argparse.Namespace) -> tuple[int, str]:
    """The number of nodes, and where it came from: as many partitions as `flwr run` would start SuperNodes."""
    import tomllib

    from flwr.common.config import parse_config_args
    from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

    from flowertune_llm.config.presets import APP_ROOT

    if args.num_partitions is not None:
        number, source = args.num_partitions, "--num-partitions"
    elif "num-supernodes" in (federation := parse_config_args(args.federation_config)):
        number, source = federation["num-supernodes"], "--federation-config num-supernodes"
    else:
        # Older Flower releases declared federations in pyproject.toml; Flower 1.42 keeps SuperLink connections in
        # ~/.flwr/config.toml, and its local simulation starts DEFAULT_SIMULATION_CONFIG's 2 SuperNodes unless
        # `flwr run --federation-config "num-supernodes=N"` says otherwise.
        with (APP_ROOT / "pyproject.toml").open("rb") as f:
            federations = tomllib.load(f)["tool"]["flwr"].get("federations", {})
        options = federations.get(federations.get("default", ""), {}).get("options", {})
        if "num-supernodes" in options:
            number, source = options["num-supernodes"], "the default federation's options.num-supernodes"
        else:
            number = DEFAULT_SIMULATION_CONFIG.num_supernodes
            source = "Flower's default simulation; set --num-partitions or --federation-config"
    if not isinstance(number, int) or number < 1:
        raise ValueError(f"{source}: {number!r} nodes; expected a positive integer")
    return number, source


def _partitions_table(shares: list, total: int, shown: int = 6) -> str:
    """One row per node: its examples, its share of all, and its most common labels."""
    width = max(len("node"), *(len(share.node) for share in shares))
    rows = [f"{'node':<{width}}  {'examples':>8}  {'share':>6}  labels (most common first)"]
    rows.append("-" * len(rows[0]))
    for share in shares:
        labels = ", ".join(f"{label} {count}" for label, count in list(share.labels.items())[:shown])
        more = len(share.labels) - shown
        labels += f", +{more} more" if more > 0 else ""
        rows.append(f"{share.node:<{width}}  {share.examples:>8}  {share.examples / total:>6.1%}  {labels}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowertune-llm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_chat_arguments(commands.add_parser("chat", help="answer a question with a base model and a trained adapter"))
    add_profile_arguments(commands.add_parser("profile", help="where a profiled run's seconds, bytes and memory went"))
    evaluate_command.add_arguments(commands.add_parser("evaluate", help="score an adapter as the FlowerTune leaderboard does"))
    add_partitions_arguments(commands.add_parser("partitions", help="each node's size and label mix, before training"))
    run_command.add_arguments(commands.add_parser("run", help="flwr run --stream, with the run config checked first, "
                                                  "Ctrl-C stopping the run, and an exit status that says how it ended"))
    handlers = {"chat": chat, "profile": profile, "evaluate": evaluate_command.run, "run": run_command.run,
                "partitions": partitions_command, **deploy_commands.add_commands(commands)}  # + federation, certs, keys
    args = parser.parse_args(argv)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
