"""Client throughput and memory on a GPU: the app's client round against plain TRL on the same batches.

For each recipe shape (a preset under ``configs/``) a random-weight copy of the recipe's base model is built
from its architecture (the dimensions of the model's ``config.json``, in :data:`ARCHITECTURES`; the Hub is
not needed) with a byte-level BPE tokenizer trained on the built-in instruction set, so token counts differ
from the real tokenizer's. Then two sides train it, each in a fresh process (clean peak memory, a cold load):

* ``app``: the app's client path: ``models.cached_peft_model`` (the recipe's quantization, adapter and
  checkpointing) and ``sft.build_trainer`` (the app's ``SFTConfig``, float32 adapter, token counting), trained
  as ``sft.train_round`` trains it, as round 1 (seed ``train.seed + 1``).
* ``trl``: plain TRL: ``from_pretrained`` with the same quantization, ``SFTTrainer`` given the same LoRA/DoRA
  config, the same data and the same ``SFTConfig`` knobs (batch, steps, rate held constant, optimizer, weight
  decay, clipping, sequence length, completion-only loss, checkpointing, precision, seed ``train.seed + 1`` so
  both see the same batches), everything else at TRL's defaults, the adapter left as TRL casts it.

Both sides count tokens the same way (a hook on the model's forward: non-padding tokens from the attention
mask, padded tokens = every position) and time each optimizer step between CUDA synchronisations. The first
``--warmup`` steps are left out of the rates. Peak memory is torch's (allocated and reserved) from before
loading to the end of training. Sides run app, trl, trl, app ... (``--repeats``) so drift hits both alike; the
table gives medians and the app/TRL ratio.

Usage (from the repository root, on a GPU machine; ``../shared/gpu/`` builds an offline bundle)::

    python -m bench.gpu_client [--recipes medical/smollm2-135m-instruct_lora_4bit ...] [--steps 12]
        [--warmup 3] [--repeats 1] [--data FILE --data-format alpaca] [--run-config "key=value ..."]
        [--layers K] [--batch B] [--seq-length L] [--work DIR]

Prints the results as JSON, writes ``bench/results/gpu_client/<gpu>.json`` and rewrites the "Client
throughput on a GPU" block of ``bench/README.md``. Without a CUDA GPU it stops at once with one line and
status 2; ``--cpu`` runs the same path on the CPU (for checking the benchmark itself: the figures are not GPU
figures, the results go to ``--work`` only and README is left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARK = "gpu_client"
README_BLOCK = "gpu-client"

# The recipe shapes of ../shared/docs/gpu-notes.md (SmolLM2-135M LoRA, SmolLM2-1.7B DoRA, OpenLLaMA-3B LoRA in
# 4 and 8 bits, Phi-4-mini DoRA, xLSTM-7B DoRA).
DEFAULT_RECIPES = (
    "medical/smollm2-135m-instruct_lora_4bit",
    "finance/smollm2-1.7b-instruct_dora_4bit",
    "general-nlp/open-llama-3b-v2_lora_4bit",
    "general-nlp/open-llama-3b-v2_lora_8bit",
    "code/phi-4-mini-instruct_dora_4bit",
    "general-nlp/xlstm-7b_dora_4bit",
)

# Architecture of each recipe's base model: the transformers config class and the fields of the model's
# config.json that set its shape (vocabulary, widths, depth, heads). The rest keeps the class's defaults.
def _llama(vocab: int, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, tied: bool) -> tuple[str, dict[str, Any]]:
    return "LlamaConfig", {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
                           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "tie_word_embeddings": tied}  # fmt: skip


ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": _llama(49152, 576, 1536, 30, 9, 3, tied=True),
    "HuggingFaceTB/SmolLM2-135M": _llama(49152, 576, 1536, 30, 9, 3, tied=True),
    "HuggingFaceTB/SmolLM2-360M-Instruct": _llama(49152, 960, 2560, 32, 15, 5, tied=True),
    "HuggingFaceTB/SmolLM2-360M": _llama(49152, 960, 2560, 32, 15, 5, tied=True),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": _llama(49152, 2048, 8192, 24, 32, 32, tied=True),
    "openlm-research/open_llama_3b_v2": _llama(32000, 3200, 8640, 26, 32, 32, tied=False),
    "openlm-research/open_llama_7b_v2": _llama(32000, 4096, 11008, 32, 32, 32, tied=False),
    "microsoft/Phi-4-mini-instruct": ("Phi3Config", {
        "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
        "num_attention_heads": 24, "num_key_value_heads": 8, "partial_rotary_factor": 0.75, "tie_word_embeddings": True,
    }),
    "NX-AI/xLSTM-7b": ("xLSTMConfig", {"vocab_size": 50304, "hidden_size": 4096, "num_hidden_layers": 32, "num_heads": 8}),
}  # fmt: skip

MIB = 2**20


class NoGPU(RuntimeError):
    """Raised before anything is built when no CUDA GPU is visible and --cpu was not given."""


def recipe_config(recipe: str, model_dir: Path | None, args: argparse.Namespace):
    """The recipe's parsed run config, pointed at the local random-weight model and the benchmark's data."""
    from flowertune_llm.config import default_run_config, load_preset, parse_run_config

    flat = {**default_run_config(), **load_preset(recipe), "preset": ""}
    if args.run_config:
        from flwr.common.config import parse_config_args

        overrides = parse_config_args([args.run_config])
        unknown = sorted(set(overrides) - set(flat))
        if unknown:
            raise ValueError(f"--run-config: unknown key {unknown[0]!r}")
        flat.update(overrides)
    if model_dir is not None:
        flat["model.name"] = str(model_dir)
    flat["static.dataset.name"] = args.data or "builtin:instructions"
    flat["static.dataset.format"] = args.data_format if args.data else "alpaca"
    flat["train.training-arguments.max-steps"] = args.warmup + args.steps
    if args.batch:
        flat["train.training-arguments.per-device-train-batch-size"] = args.batch
    if args.seq_length:
        flat["train.seq-length"] = args.seq_length
    if args.cpu:
        flat["model.device-map"] = "cpu"
    return parse_run_config(flat)


def build_model(hub_id: str, layers: int | None, directory: Path) -> Path:
    """A random-weight copy of ``hub_id``'s architecture (seed 0, bf16) with a trained BPE tokenizer; reused
    when the directory already holds one."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from flowertune_llm import builtin

    if hub_id not in ARCHITECTURES:
        raise SystemExit(f"error: no architecture for {hub_id!r} in bench/gpu_client.py ARCHITECTURES")
    class_name, fields = ARCHITECTURES[hub_id]
    fields = dict(fields)
    if layers:
        fields["num_hidden_layers"] = layers
    tokenizer = builtin.train_tokenizer(max_vocab_size=8192, model_max_length=4096)
    config = getattr(transformers, class_name)(
        **fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    scratch.rename(directory)
    return directory


# ---------------------------------------------------------------------------------------------- one side


class _Meter:
    """Counts tokens on every forward of the trained model and times each optimizer step between syncs."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.tokens = self.padded = 0
        self.steps: list[tuple[float, int, int]] = []  # (seconds, tokens, padded tokens) per optimizer step
        self._start = (0.0, 0, 0)

    def forward_pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and module.training:
            mask = kwargs.get("attention_mask")
            self.padded += ids.numel()
            self.tokens += int(mask.sum()) if mask is not None else ids.numel()

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepClock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                meter._sync()
                meter._start = (time.perf_counter(), meter.tokens, meter.padded)

            def on_step_end(self, args, state, control, **kwargs):
                meter._sync()
                began, tokens, padded = meter._start
                meter.steps.append((time.perf_counter() - began, meter.tokens - tokens, meter.padded - padded))

        return StepClock()


def _trl_trainer(config, dataset, model_path: str):
    """Plain TRL: the model as ``from_pretrained`` gives it, ``SFTTrainer`` doing the PEFT set-up itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from flowertune_llm.training import models, sft
    from flowertune_llm.weights.tensors import torch_dtype

    dtype = torch_dtype(config.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, quantization_config=models.quantization_config(config.model.quantization, dtype),
        device_map=models.device_map(config.model),
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    on_gpu = torch.cuda.is_available() and config.model.device_map != "cpu"
    knobs = config.train.training_arguments
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="gpu-client-trl-"),
        per_device_train_batch_size=knobs.per_device_train_batch_size,
        gradient_accumulation_steps=knobs.gradient_accumulation_steps,
        max_steps=knobs.max_steps,
        learning_rate=config.train.learning_rate_max,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim=sft.optimizer_name(knobs.optim, on_gpu),
        weight_decay=knobs.weight_decay,
        max_grad_norm=knobs.max_grad_norm,
        max_length=config.train.seq_length,
        completion_only_loss=True,
        activation_checkpointing=config.model.gradient_checkpointing,
        bf16=on_gpu and config.model.dtype == "bfloat16",
        fp16=on_gpu and config.model.dtype == "float16",
        use_cpu=not on_gpu,
        seed=config.train.seed + 1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=models.lora_config(config.model))  # fmt: skip
    return trainer


def measure_side(side: str, recipe: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One side's load and training, in this (fresh) process."""
    import torch

    from flowertune_llm.training import data, models, sft

    cuda = torch.cuda.is_available() and not args.cpu
    config = recipe_config(recipe, model_dir, args)
    dataset = data.load_partition(config.dataset, config.partition, config.train.seed, 0, 1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    meter = _Meter(cuda)
    started = time.perf_counter()
    if side == "app":
        model, tokenizer, _ = models.cached_peft_model(config.model)
        meter._sync()
        load_seconds = time.perf_counter() - started
        trainer, _ = sft.build_trainer(model, tokenizer, dataset, config.train, config.model, config.train.learning_rate_max, 1)
    else:
        trainer = _trl_trainer(config, dataset, str(model_dir))
        meter._sync()
        load_seconds = time.perf_counter() - started  # includes SFTTrainer's PEFT set-up, as the app's load does
    after_load = torch.cuda.memory_allocated() / MIB if cuda else None
    trainer.model.register_forward_pre_hook(meter.forward_pre_hook, with_kwargs=True)
    trainer.add_callback(meter.callback())
    output = trainer.train()
    measured = meter.steps[args.warmup :]
    seconds = sum(s for s, _, _ in measured)
    return {
        "side": side,
        "load_seconds": load_seconds,
        "train_loss": float(output.training_loss),
        "steps_measured": len(measured),
        "step_seconds_median": statistics.median(s for s, _, _ in measured),
        "tokens_per_second": sum(t for _, t, _ in measured) / seconds,
        "padded_tokens_per_second": sum(p for _, _, p in measured) / seconds,
        "padding_share": 1 - sum(t for _, t, _ in measured) / max(1, sum(p for _, _, p in measured)),
        "allocated_after_load_mib": after_load,
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / MIB if cuda else None,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / MIB if cuda else None,
        "app_token_count_agrees": (trainer.tokens == meter.tokens) if side == "app" else None,
    }


# ------------------------------------------------------------------------------------------------ driver


def _side_in_fresh_process(side: str, recipe: str, model_dir: Path, argv: list[str], work: Path) -> dict[str, Any]:
    out = work / f"{recipe.replace('/', '__')}.{side}.{time.monotonic_ns()}.json"
    command = [sys.executable, "-m", "bench.gpu_client", *argv, "--side", side, "--recipe-one", recipe,
               "--model-dir", str(model_dir), "--side-out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], check=False)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"error: the {side} side of {recipe} failed (exit {done.returncode}); its output is above")
    return json.loads(out.read_text())


def _median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def summarize(recipe: str, config, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    keys = ("tokens_per_second", "padded_tokens_per_second", "step_seconds_median", "load_seconds",
            "peak_allocated_mib", "peak_reserved_mib", "allocated_after_load_mib", "padding_share")  # fmt: skip
    sides = {side: {key: _median_of(side_runs, key) for key in keys} for side, side_runs in runs.items()}
    lora = config.model.lora
    return {
        "recipe": recipe,
        "model": config.model.name,
        "shape": {
            "quantization": config.model.quantization,
            "adapter": f"{'DoRA' if lora.use_dora else 'LoRA'} r={lora.peft_lora_r} {lora.target_modules}",
            "batch": config.train.training_arguments.per_device_train_batch_size,
            "seq_length": config.train.seq_length,
            "gradient_checkpointing": config.model.gradient_checkpointing,
            "optim": config.train.training_arguments.optim,
        },
        "app": sides["app"],
        "trl": sides["trl"],
        "app_over_trl_tokens_per_second": sides["app"]["tokens_per_second"] / sides["trl"]["tokens_per_second"],
        "runs": runs,
    }


def _table(rows: list[dict[str, Any]]) -> list[str]:
    def gb(mib):
        return "–" if mib is None else f"{mib * MIB / 1e9:.1f} GB"

    lines = ["| recipe shape | app tokens/s (padded) | TRL tokens/s (padded) | ratio | app step | app peak reserved | TRL peak reserved | app load |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        app, trl = row["app"], row["trl"]
        lines.append(
            f"| {row['recipe']} ({row['shape']['adapter']}, batch {row['shape']['batch']}) | "
            f"{app['tokens_per_second']:,.0f} ({app['padded_tokens_per_second']:,.0f}) | "
            f"{trl['tokens_per_second']:,.0f} ({trl['padded_tokens_per_second']:,.0f}) | "
            f"{row['app_over_trl_tokens_per_second']:.2f} | {app['step_seconds_median']:.3f} s | "
            f"{gb(app['peak_reserved_mib'])} | {gb(trl['peak_reserved_mib'])} | {app['load_seconds']:.1f} s |"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), help="presets under configs/")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps measured per side")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the rates")
    parser.add_argument("--repeats", type=int, default=1, help="app/TRL pairs per recipe, run ABBA")
    parser.add_argument("--data", help="a local JSON/JSONL/CSV/Parquet file (default: the built-in instruction set)")
    parser.add_argument("--data-format", default="alpaca", help="its format, as static.dataset.format")
    parser.add_argument("--run-config", help="keys set on top of every recipe, e.g. \"model.quantization=8\"")
    parser.add_argument("--layers", type=int, help="build the models with only this many decoder layers")
    parser.add_argument("--batch", type=int, help="override the recipes' per-device batch size")
    parser.add_argument("--seq-length", type=int, help="override the recipes' sequence length")
    parser.add_argument("--work", type=Path, help="where models and per-side files go (default: a temporary directory)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU to check the benchmark (not GPU figures)")
    parser.add_argument("--side", choices=("app", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--recipe-one", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def require_gpu(cpu: bool) -> None:
    import torch

    if not cpu and not torch.cuda.is_available():
        raise NoGPU("bench.gpu_client needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
                    "--cpu runs the same path on the CPU to check the benchmark")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        require_gpu(args.cpu)
    except NoGPU as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.side:  # a child: one side of one recipe
        from flowertune_llm.atomic import write_json

        write_json(args.side_out, measure_side(args.side, args.recipe_one, args.model_dir, args))
        return 0

    from bench import block_header
    from testbed import results

    try:  # every recipe named right, before any model is built
        configs = {recipe: recipe_config(recipe, None, args) for recipe in args.recipes}
    except (ValueError, OSError) as error:  # ConfigError is a ValueError naming the key
        print(f"error: {error}", file=sys.stderr)
        return 2
    load_before = results.load()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-client-")))
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        rows = []
        for recipe in args.recipes:
            hub_id = configs[recipe].model.name
            suffix = f"-{args.layers}layers" if args.layers else ""
            model_dir = build_model(hub_id, args.layers, work / f"{hub_id.replace('/', '__')}{suffix}")
            runs: dict[str, list[dict[str, Any]]] = {"app": [], "trl": []}
            for repeat in range(args.repeats):
                for side in ("app", "trl") if repeat % 2 == 0 else ("trl", "app"):
                    print(f"[gpu_client] {recipe}: {side} (pair {repeat + 1} of {args.repeats})", file=sys.stderr, flush=True)
                    runs[side].append(_side_in_fresh_process(side, recipe, model_dir, argv, work))
            rows.append(summarize(recipe, configs[recipe], runs))  # the recipe's own model name, not the copy's path
        import torch

        payload = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(0), "warmup_steps": args.warmup,
                   "measured_steps": args.steps, "layers": args.layers, "rows": rows}  # fmt: skip
        print(json.dumps(payload, indent=2))
        if args.cpu:
            (work / "gpu_client-cpu.json").write_text(json.dumps(payload, indent=2))
            print(f"[gpu_client] CPU check only: {work / 'gpu_client-cpu.json'} (README left alone)", file=sys.stderr)
            return 0
        variant = payload["device"].lower().replace(" ", "-") + (f"-{args.layers}layers" if args.layers else "")
        path = results.write(BENCHMARK, variant, payload, load_before)
        meta = results.read(BENCHMARK, path.stem)["meta"]
        lines = [*block_header(meta, f"{payload['device']}, {meta['machine']['cores']} cores",
                               str(path.relative_to(results.README.parent))), *_table(rows)]  # fmt: skip
        results.rewrite_readme_block(README_BLOCK, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
