"""The ``flowertune-llm`` command. Flower's CLI has no plugin hook, so our tools live here, not under ``flwr``."""

from __future__ import annotations

import argparse
import sys

from flowertune_llm.templates import CHAT_TEMPLATES


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peft-path", required=True, help="a checkpoint directory: <run dir>/checkpoints/round-N")
    parser.add_argument("--question", required=True)
    parser.add_argument("--template", default="vicuna_v1.1", choices=sorted(CHAT_TEMPLATES))
    parser.add_argument("--quantization", type=int, default=0, choices=(0, 4, 8))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")


def chat(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowertune_llm.inference import answer, load_adapter_model
    from flowertune_llm.templates import chat_template

    if not (Path(args.peft_path) / "adapter_config.json").is_file():
        print(f"error: --peft-path {args.peft_path} has no adapter_config.json", file=sys.stderr)
        return 2
    model, tokenizer = load_adapter_model(args.peft_path, args.quantization, args.dtype)
    print(answer(model, tokenizer, args.question, chat_template(args.template), args.max_new_tokens, args.temperature))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowertune-llm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_chat_arguments(commands.add_parser("chat", help="answer a question with a base model and a trained adapter"))
    args = parser.parse_args(argv)
    return {"chat": chat}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
