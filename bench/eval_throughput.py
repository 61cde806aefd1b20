"""Evaluation throughput: multiple-choice prompts generated one at a time (the leaderboard's way) or in batches.

    python -m bench.eval_throughput [--model builtin:small-llama] [--examples 192] [--batch-sizes 4 16 32]

The leaderboard's general-NLP and medical evaluation calls ``generate`` once per prompt, one answer token
each; ``flowertune-llm evaluate --batched`` generates each batch of prompts in one left-padded call. Both
run here on the same MMLU-shaped prompts (the app's built-in instructions as questions, four options,
``flowertune_llm.evaluate.prompts``), with the same model and adapter (a fresh LoRA adapter with random
B, so it changes the answers), alternating modes to share the machine's drift. Reported: examples per
second for each, the speed-up over one at a time, and how many answers the batched mode changes (left
padding changes the floating-point sums a little; greedy decoding can flip where two tokens tie).

Prints JSON, writes ``bench/results/eval_throughput/<model>-cpu.json`` (or ``-gpu``) and the block between
the ``eval-throughput`` markers in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import block_header
from testbed import results

BENCHMARK = "eval_throughput"
README_BLOCK = "eval-throughput"


def prompts(count: int, seed: int = 0) -> list:
    from flowertune_llm.builtin import dataset_path
    from flowertune_llm.evaluate import prompts as leaderboard
    from flowertune_llm.evaluate.benchmarks import Example

    rows = [json.loads(line) for line in Path(dataset_path("builtin:instructions")).read_text().splitlines()]
    rng = random.Random(seed)
    words = [w for r in rows for w in r["output"].split()][:4000]
    examples = []
    for row in rng.sample(rows, count):
        body = leaderboard.question_with_options(row["instruction"], [" ".join(rng.sample(words, 3)) for _ in range(4)])
        examples.append(Example("stem", leaderboard.answer_prompt(leaderboard.MMLU_INSTRUCTION, body), rng.choice("ABCD")))
    return examples


def model_with_adapter(name: str, directory: Path):
    from flowertune_llm.config import default_run_config, parse_run_config
    from flowertune_llm.evaluate import generation
    from flowertune_llm.training import models

    config = parse_run_config({**default_run_config(), "preset": "quickstart", "model.name": name})
    torch.manual_seed(0)
    peft = models.build_peft_model(config.model)
    for parameter_name, parameter in peft.named_parameters():
        if "lora_B" in parameter_name:
            parameter.data.normal_(0, 0.5)
    peft.save_pretrained(directory)
    return generation.load_model(directory, models.resolve_model_path(name), 0, merge=False)


def measure(model, tokenizer, examples, batch_size: int, batched: bool) -> tuple[float, list[str]]:
    from flowertune_llm.evaluate import generation

    start = time.perf_counter()
    outputs = generation.answers(model, tokenizer, examples, batch_size, batched=batched)
    return len(examples) / (time.perf_counter() - start), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--examples", type=int, default=192)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per setting")
    args = parser.parse_args()
    load_before = results.load()
    examples = prompts(args.examples)
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = model_with_adapter(args.model, Path(scratch))
        measure(model, tokenizer, examples[:8], 4, False)  # warm-up: first-call allocations
        rows = []
        for batch_size in args.batch_sizes:
            one, many, changed = [], [], []
            for _ in range(args.repeats):
                rate, sequential = measure(model, tokenizer, examples, batch_size, batched=False)
                one.append(rate)
                rate, batched = measure(model, tokenizer, examples, batch_size, batched=True)
                many.append(rate)
                changed.append(sum(a != b for a, b in zip(sequential, batched)))
            rows.append({
                "batch_size": batch_size,
                "one_at_a_time_examples_per_second": statistics.median(one),
                "batched_examples_per_second": statistics.median(many),
                "speedup": statistics.median(many) / statistics.median(one),
                "answers_changed": max(changed),
                "examples": len(examples),
            })  # fmt: skip
    device = "gpu" if torch.cuda.is_available() else "cpu"
    payload = {"model": args.model, "device": device, "torch_threads": torch.get_num_threads(), "rows": rows}
    path = results.write(BENCHMARK, f"{args.model.removeprefix('builtin:')}-{device}", payload, load_before)
    print(json.dumps(payload, indent=2))
    meta = results.read(BENCHMARK, path.stem)["meta"]
    lines = [*block_header(meta, f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores", str(path.relative_to(results.README.parent)))]
    lines += ["| batch | one at a time, examples/s | batched, examples/s | speed-up | answers changed |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['batch_size']} | {row['one_at_a_time_examples_per_second']:.1f} | "
                     f"{row['batched_examples_per_second']:.1f} | {row['speedup']:.2f}x | "
                     f"{row['answers_changed']} of {row['examples']} |")  # fmt: skip
    results.rewrite_readme_block(README_BLOCK, "\n".join(lines))


if __name__ == "__main__":
    main()
