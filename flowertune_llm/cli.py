"""The ``flowertune-llm`` command. Flower's CLI has no plugin hook, so our tools live here, not under ``flwr``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowertune_llm.deploy import commands as deploy_commands
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowertune-llm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_chat_arguments(commands.add_parser("chat", help="answer a question with a base model and a trained adapter"))
    add_profile_arguments(commands.add_parser("profile", help="where a profiled run's seconds, bytes and memory went"))
    evaluate_command.add_arguments(commands.add_parser("evaluate", help="score an adapter as the FlowerTune leaderboard does"))
    handlers = {"chat": chat, "profile": profile, "evaluate": evaluate_command.run,
                **deploy_commands.add_commands(commands)}  # + federation, certs, keys
    args = parser.parse_args(argv)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
