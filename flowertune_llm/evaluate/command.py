"""``flowertune-llm evaluate``: score an adapter on a challenge the way the FlowerTune leaderboard does.

Everything that can be wrong is checked before a model loads: the challenge and datasets, the adapter
(``adapter_config.json`` and a readable ``adapter_model.safetensors``), every data file and its columns,
and the tools code needs (``node``, ``g++``: a dataset whose tool is missing is *skipped*, with the reason,
never scored 0). Then the model generates (a progress bar over examples), the generations are saved as
``<output>.predictions.jsonl`` (``dataset``, ``output``, ``target`` per line, exactly what ``--predictions``
re-scores without a model), the scores go to ``--output``, and a table in the leaderboard's layout is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowertune_llm.atomic import write_atomic, write_json
from flowertune_llm.evaluate import benchmarks as registry
from flowertune_llm.evaluate import programs, sandbox, scoring, sources
from flowertune_llm.evaluate.benchmarks import Benchmark, Example
from flowertune_llm.units import MiB

DEFAULT_BATCH = {"general-nlp": 16, "finance": 32, "medical": 16, "code": 4}  # the leaderboard's commands


class EvaluationError(ValueError):
    """Bad input, found before any model loads; the message names the file, key or value."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--challenge", required=True, choices=sorted(registry.CHALLENGES))
    parser.add_argument("--peft-path", type=Path, help="the adapter: <run dir>/checkpoints/round-N (not needed with --predictions)")
    parser.add_argument("--base-model", help="default: the adapter's base_model_name_or_path")
    parser.add_argument("--datasets", help="comma-separated (default: the leaderboard's set of the challenge)")
    parser.add_argument("--batch-size", type=int, help="default: the leaderboard's (16, 32 finance, 4 samples per problem code)")
    parser.add_argument("--quantization", type=int, choices=(4, 8, 0),
                        help="4 (the leaderboard's FP4) for general-nlp, finance, medical; 0 (float32, merged) for code")  # fmt: skip
    parser.add_argument("--limit", type=int, help="the first N examples of each dataset (a quick look; not comparable)")
    parser.add_argument("--data-dir", type=Path, help="read <name>.jsonl/.json/.parquet/.csv here instead of the Hub")
    parser.add_argument("--output", type=Path, help="results JSON (default: <run dir>/evaluation/<challenge>-round-N.json)")
    parser.add_argument("--predictions", type=Path, help="score this FILE.jsonl of saved generations; loads no model")
    parser.add_argument("--batched", action="store_true", help="general-nlp/medical: one generate call per batch (faster)")


def run(args: argparse.Namespace) -> int:
    try:
        chosen = registry.select(args.challenge, args.datasets)
        if args.batch_size is not None and args.batch_size < 1 or args.limit is not None and args.limit < 1:
            raise EvaluationError("--batch-size and --limit must be positive")
        if args.predictions is None and args.peft_path is None:
            raise EvaluationError("--peft-path is needed to generate (or give --predictions to score saved generations)")
        from flowertune_llm.training.adapters import check_adapter  # reads safetensors headers: torch, only now

        base_model = check_adapter(args.peft_path, args.base_model) if args.peft_path else args.base_model
        skipped = {b.name: reason for b in chosen if (reason := programs.missing_tool(b.answer))}
        output = args.output or default_output(args.peft_path, args.challenge)
        if args.predictions:
            generated = read_predictions(args.predictions, [b for b in chosen if b.name not in skipped])
        else:
            examples = build_examples(chosen, args.data_dir, args.limit, skipped)
            generated = generate(args, base_model, chosen, examples, output)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = score(args, base_model, chosen, generated, skipped)
    write_json(output, results)
    print(table(results))
    print(f"Results: {output.resolve()}", file=sys.stderr)
    return 0


# --- before any model loads ------------------------------------------------------------------------------------


def default_output(peft_path: Path | None, challenge: str) -> Path:
    """Beside the run's other outputs when the adapter is a run's checkpoint, else in the working directory."""
    if peft_path is not None and (peft_path.parent.parent / "history.json").is_file():
        return peft_path.parent.parent / "evaluation" / f"{challenge}-{peft_path.name}.json"
    return Path(f"evaluation-{challenge}.json").resolve()


def build_examples(chosen: Sequence[Benchmark], data_dir: Path | None, limit: int | None,
                   skipped: dict[str, str]) -> dict[str, list[Example]]:  # fmt: skip
    wanted = [b for b in chosen if b.name not in skipped]
    rows = sources.load_rows([b.source for b in wanted], data_dir)
    examples = {}
    for benchmark in wanted:
        built = benchmark.build(benchmark.name, rows[benchmark.source.name])
        warning = sources.check_count(benchmark, len(built), limited=limit is not None or data_dir is not None)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        examples[benchmark.name] = built[:limit] if limit else built
    return examples


def read_predictions(path: Path, chosen: Sequence[Benchmark]) -> dict[str, list[dict[str, str]]]:
    names = {b.name for b in chosen}
    generated: dict[str, list[dict[str, str]]] = {name: [] for name in names}
    if not path.is_file():
        raise EvaluationError(f"--predictions {path}: no such file")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvaluationError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("dataset", "output", "target")):
            raise EvaluationError(f"{path}:{number}: expected {{\"dataset\", \"output\", \"target\"}} as strings")
        if row["dataset"] in names:
            generated[row["dataset"]].append(row)
    empty = sorted(n for n, rows in generated.items() if not rows)
    if empty:
        raise EvaluationError(f"{path}: no predictions for {', '.join(empty)}")
    return generated


# --- generating -------------------------------------------------------------------------------------------------


def generate(args: argparse.Namespace, base_model: str, chosen: Sequence[Benchmark],
             examples: dict[str, list[Example]], output: Path) -> dict[str, list[dict[str, str]]]:  # fmt: skip
    from tqdm import tqdm

    from flowertune_llm.evaluate import generation

    code = args.challenge == "code"
    quantization = args.quantization if args.quantization is not None else (0 if code else 4)
    batch = args.batch_size or DEFAULT_BATCH[args.challenge]
    model, tokenizer = generation.load_model(args.peft_path, base_model, quantization, merge=code)
    generated: dict[str, list[dict[str, str]]] = {}
    predictions = output.with_suffix(".predictions.jsonl")
    for benchmark in (b for b in chosen if b.name in examples):
        todo = examples[benchmark.name]
        with tqdm(total=len(todo), desc=benchmark.name, unit="example", file=sys.stderr) as bar:
            if code:
                outputs = generation.completions(model, tokenizer, todo, benchmark.max_length, batch, bar.update)
            elif benchmark.answer == "sentiment":
                outputs = generation.sentiments(model, tokenizer, todo, batch, bar.update)
            else:
                outputs = generation.answers(model, tokenizer, todo, batch, batched=args.batched, progress=bar.update)
        generated[benchmark.name] = [{"dataset": e.dataset, "output": o, "target": e.target} for e, o in zip(todo, outputs)]
        lines = [json.dumps(row) for rows in generated.values() for row in rows]
        write_atomic(predictions, ("\n".join(lines) + "\n").encode())  # kept as each dataset finishes
    print(f"Predictions: {predictions.resolve()}", file=sys.stderr)
    return generated


# --- scoring ----------------------------------------------------------------------------------------------------


def score(args: argparse.Namespace, base_model: str | None, chosen: Sequence[Benchmark],
          generated: dict[str, list[dict[str, str]]], skipped: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    from tqdm import tqdm

    datasets: dict[str, dict[str, Any]] = {}
    for benchmark in chosen:
        if benchmark.name in skipped:
            datasets[benchmark.name] = {benchmark.metric: None, "count": 0, "skipped": skipped[benchmark.name]}
            continue
        rows = generated[benchmark.name]
        if benchmark.metric == "pass@1":
            with tqdm(total=len(rows), desc=f"{benchmark.name} (running)", unit="program", file=sys.stderr) as bar:
                results = programs.run_all([r["output"] + "\n" + r["target"] for r in rows], benchmark.answer,
                                           progress=lambda: bar.update(1))  # fmt: skip
            value = programs.pass_at_1(results)
        else:
            value = scoring.accuracy([r["output"] for r in rows], [r["target"] for r in rows], benchmark.answer)
        datasets[benchmark.name] = {benchmark.metric: value, "count": len(rows), "skipped": None}
    scored = [datasets[n][b.metric] * 100 for n, b in ((b.name, b) for b in chosen)
              if datasets[n]["skipped"] is None and n in registry.LEADERBOARD[args.challenge]]  # fmt: skip
    return {
        "challenge": args.challenge,
        "datasets": datasets,
        "average": registry.leaderboard_average(scored),
        "peft_path": str(args.peft_path.resolve()) if args.peft_path else None,
        "base_model": base_model,
        "communication_mb": communication_mb(args.peft_path),
        "sandbox": {"isolation": sandbox.isolation(), "process_limit": sandbox.process_limit()} if args.challenge == "code" else None,
        "limit": args.limit,
    }


def communication_mb(peft_path: Path | None) -> float | None:
    """What the run had exchanged when it saved this adapter (round N's history and before), in MB of 2**20 bytes
    as the leaderboard's budget counts them; None when the adapter is not a run's checkpoint."""
    if peft_path is None or not peft_path.name.startswith("round-"):
        return None
    history = peft_path.parent.parent / "history.json"
    if not history.is_file():
        return None
    up_to = int(peft_path.name.removeprefix("round-"))
    rounds = json.loads(history.read_text())
    return sum(r["bytes_down"] + r["bytes_up"] for r in rounds if r["round"] <= up_to) / MiB


def table(results: dict[str, Any]) -> str:
    """The leaderboard's layout: one column per dataset (percent), the average, the communication in GB."""
    names = registry.by_name(results["challenge"])
    headers, cells = [], []
    for name, entry in results["datasets"].items():
        headers.append(names[name].title)
        value = entry[names[name].metric]
        cells.append("skipped" if entry["skipped"] else f"{value * 100:.2f}")
    headers.append("Avg")
    cells.append("-" if results["average"] is None else f"{results['average']:.2f}")
    headers.append("Comm. Costs")
    mb = results["communication_mb"]
    cells.append("-" if mb is None else f"{mb / 1024:.2f} GB")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|", "| " + " | ".join(cells) + " |"]
    notes = [f"{n}: skipped, {e['skipped']}" for n, e in results["datasets"].items() if e["skipped"]]
    if results.get("limit"):
        notes.append(f"--limit {results['limit']}: a quick look, not comparable with the leaderboard")
    return "\n".join([f"{results['challenge']} ({results['base_model']} + {results['peft_path']})", *lines, *notes])
