"""Built-in models and data, so the quickstart and the tests run offline.

``model.name = "builtin:<name>"`` names a small Llama built from a config with seeded random weights and a
byte-level BPE tokenizer trained on the shipped instruction set. It is written once per machine to a cache
directory and from then on loaded through the same ``from_pretrained`` path as any Hub model; adapters
record that absolute directory as their base model, so PEFT loads them from any working directory.

``static.dataset.name = "builtin:instructions"`` is the instruction set in this folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

PREFIX = "builtin:"
DATA_DIR = Path(__file__).resolve().parent
# Bump when the recipe below changes, so caches built by an older version are not reused.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class BuiltinModel:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_vocab_size: int = 2048
    max_position_embeddings: int = 512


MODELS = {
    # 0.8M parameters: the quickstart and the integration tests.
    "tiny-llama": BuiltinModel(128, 256, 2, 4, 2),
    # 12M parameters: benchmarks that need a model whose loading is not negligible.
    "small-llama": BuiltinModel(384, 1024, 6, 6, 2),
}
DATASETS = {"instructions": DATA_DIR / "instructions.jsonl"}


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def _lookup(name: str, table: dict) -> str:
    short = name.removeprefix(PREFIX)
    if short not in table:
        raise ValueError(f"unknown built-in {name!r}; available: {', '.join(PREFIX + k for k in table)}")
    return short


def dataset_path(name: str) -> Path:
    return DATASETS[_lookup(name, DATASETS)]


def cache_root() -> Path:
    return Path(os.environ.get("FLOWERTUNE_LLM_CACHE", "~/.cache/flowertune-llm")).expanduser().resolve()


def model_path(name: str) -> Path:
    """The directory holding the built-in model and tokenizer, built on first use (safe under concurrency)."""
    short = _lookup(name, MODELS)
    target = cache_root() / f"{short}-v{RECIPE_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several simulation actors may build at once: each writes its own temporary directory and the first
    # rename wins. The build is deterministic, so whichever wins is the same model.
    scratch = Path(tempfile.mkdtemp(prefix=f".{short}-", dir=target.parent))
    try:
        _build(MODELS[short], scratch)
        scratch.chmod(0o755)
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _training_text() -> list[str]:
    from flowertune_llm.training.templates import ALPACA_PREAMBLE_WITH_INPUT, CHAT_TEMPLATES

    lines = [ALPACA_PREAMBLE_WITH_INPUT, "### Instruction:", "### Input:", "### Response:"]
    lines += [t.prefix + t.suffix for t in CHAT_TEMPLATES.values()]
    with DATASETS["instructions"].open() as f:
        for line in f:
            record = json.loads(line)
            lines += [record["instruction"], record["input"], record["output"]]
    return lines


def train_tokenizer(max_vocab_size: int, model_max_length: int):
    """A byte-level BPE tokenizer trained on the built-in instruction set and the prompt templates (a fraction
    of a second): the built-in models' tokenizer, and the stand-in for a real one where the Hub is out of reach."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token: no <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=model_max_length
    )


def _build(spec: BuiltinModel, directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(spec.max_vocab_size, spec.max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
