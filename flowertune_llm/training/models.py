"""Base models and their adapters: loading, quantization, the per-process cache, adapter state in and out."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from flowertune_llm import builtin
from flowertune_llm.config import ConfigError, ModelConfig
from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.tensors import TORCH_DTYPES, TensorSpec, torch_dtype

log = logging.getLogger(__name__)

AdapterState = dict[str, torch.Tensor]


def resolve_model_path(name: str) -> str:
    """What ``from_pretrained`` gets: a built-in's cache directory, a local directory made absolute
    (PEFT stores it in ``adapter_config.json``; a relative one would later be read as a Hub id), or a Hub id."""
    if builtin.is_builtin(name):
        return str(builtin.model_path(name))
    local = Path(name).expanduser()
    return str(local.resolve()) if local.is_dir() else name


# Files an averaged full model needs besides its weights to load with from_pretrained.
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")


def local_weights(name: str) -> Path:
    """A directory holding the model's safetensors files: the built-in's, a local one, or the Hub snapshot.

    For a Hub id this downloads the weights once into the Hugging Face cache (the node's copy of the model).
    """
    path = Path(resolve_model_path(name))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.safetensors.index.json", *MODEL_CONFIG_FILES]))


def weight_manifest(name: str) -> tuple[dict[str, TensorSpec], dict[str, bytes]]:
    """Every tensor's shape and dtype in on-disk order, and the config files, without reading any weights.

    For a Hub id only the safetensors headers are fetched (HTTP range requests), so a server can plan
    and write a 70B model's average without ever holding or downloading the model.
    """
    path = Path(resolve_model_path(name))
    if path.is_dir():
        files = {f: (path / f).read_bytes() for f in MODEL_CONFIG_FILES if (path / f).is_file()}
        return LocalCheckpoint(path).specs, files
    from huggingface_hub import get_safetensors_metadata, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    located = []
    for filename, metadata in get_safetensors_metadata(name).files_metadata.items():
        for tensor, info in metadata.tensors.items():
            spec = TensorSpec(tuple(info.shape), TORCH_DTYPES[info.dtype])
            located.append((filename, info.data_offsets[0], tensor, spec))
    files = {}
    for config_file in MODEL_CONFIG_FILES:
        try:
            files[config_file] = Path(hf_hub_download(name, config_file)).read_bytes()
        except EntryNotFoundError:
            pass
    return {tensor: spec for _, _, tensor, spec in sorted(located)}, files


def device_map(config: ModelConfig) -> str | dict[str, int]:
    """``auto`` is the one GPU this process was given (Ray sets CUDA_VISIBLE_DEVICES per actor), else the CPU."""
    if config.device_map != "auto":
        return config.device_map
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"


def quantization_config(bits: int, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """QLoRA's NF4 with double quantization for 4 bits, LLM.int8() for 8, None for an unquantized model."""
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def lora_config(config: ModelConfig) -> LoraConfig:
    """The adapter's PEFT config; the server writes the same one into every checkpoint."""
    lora = config.lora
    return LoraConfig(
        r=lora.peft_lora_r,
        lora_alpha=lora.peft_lora_alpha,
        lora_dropout=lora.peft_lora_dropout,
        target_modules=lora.target_module_names,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=resolve_model_path(config.name),
    )


def check_target_modules(config: ModelConfig) -> None:
    """Fail on a target module the architecture lacks, from its config alone (no weights are loaded)."""
    names = config.lora.target_module_names
    if not names:
        return
    from accelerate import init_empty_weights

    model_config = AutoConfig.from_pretrained(resolve_model_path(config.name))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config)
    module_names = [name for name, _ in skeleton.named_modules()]
    missing = [t for t in names if not any(n == t or n.endswith(f".{t}") for n in module_names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            "model.lora.target-modules",
            config.lora.target_modules,
            f"{config.name} has no module named {', '.join(missing)}; its linear layers are: {', '.join(leaves)}",
        )


def _disable_bnb_cpu_inference_repack(model: torch.nn.Module) -> None:
    # On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit weight into an inference-only layout on its
    # first no-grad forward; training afterwards backpropagates through an op without autograd support and
    # LoRA gradients come out silently wrong (off by up to 62% on bitsandbytes 0.50, measured against a
    # dequantized reference). Opting out keeps them exact.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base_model(config: ModelConfig) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(config.name),
        dtype=torch_dtype(config.dtype),
        quantization_config=quantization_config(config.quantization, torch_dtype(config.dtype)),
        device_map=device_map(config),
    )
    if config.quantization:
        _disable_bnb_cpu_inference_repack(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    model.config.use_cache = False  # the KV cache only costs memory while training
    return model


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_peft_model(config: ModelConfig) -> PeftModel:
    """Base model with a fresh LoRA/DoRA adapter; adapter weights stay float32 whatever the base dtype."""
    return get_peft_model(load_base_model(config), lora_config(config))


_cache: dict[ModelConfig, tuple[PeftModel, PreTrainedTokenizerBase]] = {}


def cached_peft_model(config: ModelConfig) -> tuple[PeftModel, PreTrainedTokenizerBase, bool]:
    """The process's model and tokenizer, built on first use and reused by every later round.

    Simulation actors live for the whole run, so the base model is loaded once per actor, not once per
    round; only the adapter weights change hands. Returns ``(model, tokenizer, cache_hit)``.
    """
    if config in _cache:
        return (*_cache[config], True)
    gc.unfreeze()  # so the model being replaced can be collected
    _cache.clear()  # a new model replaces the old one rather than sitting beside it
    gc.collect()
    _cache[config] = (build_peft_model(config), load_tokenizer(config))
    # The model and the libraries loaded with it live as long as the process. Freezing them takes them out
    # of the garbage collector's sight: each round's Trainer calls gc.collect() several times, and walking
    # these millions of objects again was most of a round's fixed cost (bench/README.md).
    gc.collect()
    gc.freeze()
    return (*_cache[config], False)


def get_adapter_state(model: PeftModel) -> AdapterState:
    """The adapter's tensors on the CPU, detached copies safe to send while the model trains on."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model: PeftModel, state: AdapterState) -> None:
    """Load a complete adapter state; a missing or foreign key is an error, never a silent partial load."""
    expected = get_peft_model_state_dict(model).keys()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"adapter state lacks {len(missing)} of {len(expected)} tensors, e.g. {missing[0]}")
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ValueError(f"adapter state has tensors this model lacks, e.g. {result.unexpected_keys[0]}")


def check_init_adapter(config: ModelConfig) -> None:
    """``model.init-adapter`` is a PEFT adapter whose settings are this run's ``model.lora.*`` (before any model loads)."""
    path = Path(config.init_adapter).expanduser()
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file() or not (path / "adapter_model.safetensors").is_file():
        raise ConfigError("model.init-adapter", config.init_adapter,
                          f"not a PEFT adapter directory (needs adapter_config.json and adapter_model.safetensors in {path})")  # fmt: skip
    saved = json.loads(adapter_config.read_text())
    lora = config.lora
    expected = {
        "model.lora.peft-lora-r": ("r", lora.peft_lora_r),
        "model.lora.peft-lora-alpha": ("lora_alpha", lora.peft_lora_alpha),
        "model.lora.use-dora": ("use_dora", lora.use_dora),
    }
    for key, (field, value) in expected.items():
        if saved.get(field) != value:
            raise ConfigError(key, value, f"model.init-adapter {path} has {field}={saved.get(field)!r}")
    if lora.target_module_names is not None:
        targets = saved.get("target_modules") or []
        targets = sorted([targets] if isinstance(targets, str) else targets)
        if targets != sorted(lora.target_module_names):
            raise ConfigError("model.lora.target-modules", lora.target_modules,
                              f"model.init-adapter {path} adapts {','.join(targets)}")  # fmt: skip


def load_init_adapter(config: ModelConfig, expected: dict[str, TensorSpec]) -> AdapterState:
    """The adapter at ``model.init-adapter`` as this run's adapter state (float32, PEFT's keys), shapes checked."""
    from safetensors.torch import load_file

    weights = Path(config.init_adapter).expanduser() / "adapter_model.safetensors"
    state = load_file(weights)
    # PEFT saves keys without the adapter's name, as get_peft_model_state_dict gives them.
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ConfigError("model.init-adapter", config.init_adapter,
                          f"its tensors differ from this run's adapter: {len(missing)} missing (e.g. {missing[:1]}), "
                          f"{len(extra)} unexpected (e.g. {extra[:1]}); check model.lora.target-modules")  # fmt: skip
    for name, spec in expected.items():
        if tuple(state[name].shape) != spec.shape:
            raise ConfigError("model.lora.peft-lora-r", config.lora.peft_lora_r,
                              f"model.init-adapter's {name} is {list(state[name].shape)}, this run's {list(spec.shape)}")  # fmt: skip
    return {name: state[name].to(expected[name].dtype).contiguous() for name in expected}
