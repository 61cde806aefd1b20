"""The run config: parsed once from Flower's flat ``run_config`` into typed, validated objects.

Flower hands every app a flat dict with dotted keys (``model.lora.peft-lora-r``). Each section below is a
frozen dataclass whose fields are named after those keys (``-`` becomes ``_``) and whose ``PREFIX`` says
where the section lives, so a key maps to exactly one field and back. Defaults live in one place only,
``[tool.flwr.app.config]`` in ``pyproject.toml``; config/presets.py reads them from there and layers a
preset under the user's overrides.

Every check runs at construction and raises :class:`ConfigError` naming the key, the value and what is
allowed, so a bad run stops before any model or dataset is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

from flowertune_llm.config.errors import ConfigError
from flowertune_llm.config.presets import resolve_preset

QUANTIZATIONS = (0, 4, 8)
DTYPES = ("float32", "bfloat16", "float16")
DATASET_FORMATS = ("general-nlp", "finance", "medical", "code", "alpaca")
AGGREGATION_MODES = ("layerwise", "all_at_once")
UPDATE_FORMATS = ("float32", "bfloat16", "int8")  # weights/codec.py
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox")
# strategy.server-learning-rate=0 means the strategy's own default: Flower's classes' (Reddi et al.'s for the
# adaptive ones). FedAvg and FedProx have no server step.
DEFAULT_SERVER_LEARNING_RATES = {"fedavgm": 1.0, "fedadam": 0.1, "fedyogi": 0.01, "fedadagrad": 0.1}
# flwr-datasets' partitioners: IID, label-skewed (by a column or a derived one), and size-skewed.
PARTITION_METHODS = ("iid", "dirichlet", "pathological", "shard", "linear", "square", "exponential")
LABEL_SKEWED = ("dirichlet", "pathological", "shard")


def _key(section: Any, field_name: str) -> str:
    return section.PREFIX + field_name.replace("_", "-")


def _require(section: Any, field_name: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ConfigError(_key(section, field_name), getattr(section, field_name), problem)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA or DoRA adapter settings (PEFT's ``LoraConfig``)."""

    PREFIX: ClassVar[str] = "model.lora."
    peft_lora_r: int
    peft_lora_alpha: float
    peft_lora_dropout: float
    target_modules: str  # comma-separated; "" lets PEFT pick its default for the architecture
    use_dora: bool

    def __post_init__(self) -> None:
        _require(self, "peft_lora_r", self.peft_lora_r > 0, "the rank must be a positive integer")
        _require(self, "peft_lora_alpha", self.peft_lora_alpha > 0, "alpha must be positive")
        _require(self, "peft_lora_dropout", 0 <= self.peft_lora_dropout < 1, "allowed: 0 <= dropout < 1")
        modules = self.target_modules.split(",")
        _require(
            self,
            "target_modules",
            not self.target_modules or all(m.strip() for m in modules),
            "expected comma-separated module names such as 'q_proj,v_proj', or '' for PEFT's default",
        )

    @property
    def target_module_names(self) -> list[str] | None:
        return [m.strip() for m in self.target_modules.split(",")] if self.target_modules else None


@dataclass(frozen=True)
class ModelConfig:
    """The base model: where it comes from, how it is quantized and placed, and its adapter."""

    PREFIX: ClassVar[str] = "model."
    name: str
    quantization: int
    dtype: str
    device_map: str  # "auto": the GPU Flower/Ray assigned when there is one, else the CPU
    gradient_checkpointing: bool
    init_adapter: str  # a PEFT adapter directory round 1 starts from; "" for PEFT's initialisation (seeded)
    lora: LoraSettings

    def __post_init__(self) -> None:
        _require(self, "name", bool(self.name.strip()), "a Hub id, a local directory or 'builtin:<name>'")
        _require(
            self, "quantization", self.quantization in QUANTIZATIONS, f"allowed: {', '.join(map(str, QUANTIZATIONS))}"
        )
        _require(self, "dtype", self.dtype in DTYPES, f"allowed: {', '.join(DTYPES)}")
        _require(self, "device_map", bool(self.device_map), "allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")


@dataclass(frozen=True)
class TrainingArguments:
    """The subset of ``trl.SFTConfig`` a recipe sets; everything else keeps TRL's default."""

    PREFIX: ClassVar[str] = "train.training-arguments."
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    max_steps: int
    optim: str
    weight_decay: float
    max_grad_norm: float
    logging_steps: int

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            _require(self, name, getattr(self, name) > 0, "must be a positive integer")
        _require(self, "max_steps", self.max_steps >= 0, "a positive integer, or 0 for an aggregation-only run")
        _require(self, "weight_decay", self.weight_decay >= 0, "must be >= 0")
        _require(self, "max_grad_norm", self.max_grad_norm > 0, "must be > 0")
        _require(self, "optim", bool(self.optim), "a transformers optimizer name such as 'adamw_torch'")


@dataclass(frozen=True)
class TrainConfig:
    """Local training and the learning-rate schedule across rounds."""

    PREFIX: ClassVar[str] = "train."
    save_every_round: int
    learning_rate_max: float
    learning_rate_min: float
    seq_length: int
    seed: int  # the initial adapter, partitions, held-out split, node sampling, and each round's batches
    deterministic: bool  # PyTorch's deterministic algorithms (GPU: slower); CPU runs repeat bit for bit anyway
    training_arguments: TrainingArguments

    def __post_init__(self) -> None:
        _require(self, "save_every_round", self.save_every_round > 0, "must be a positive integer")
        _require(self, "seq_length", self.seq_length > 0, "must be a positive integer")
        _require(self, "learning_rate_min", self.learning_rate_min >= 0, "must be >= 0")
        _require(
            self,
            "learning_rate_max",
            self.learning_rate_max >= self.learning_rate_min and math.isfinite(self.learning_rate_max),
            f"must be >= train.learning-rate-min ({self.learning_rate_min})",
        )


@dataclass(frozen=True)
class StrategyConfig:
    """Which nodes train each round, how long the server waits for them, and how their updates become the
    new global model: FedAvg, a server optimizer on the pseudo-gradient, or FedProx's proximal term."""

    PREFIX: ClassVar[str] = "strategy."
    name: str  # fedavg | fedavgm | fedadam | fedyogi | fedadagrad | fedprox
    fraction_train: float
    min_train_nodes: int
    round_timeout: float  # seconds; LLM rounds can outlast Flower's one-hour default
    server_learning_rate: float  # η of the server step; 0: the strategy's default (DEFAULT_SERVER_LEARNING_RATES)
    server_momentum: float  # μ, FedAvgM
    beta_1: float  # FedAdam, FedYogi, FedAdagrad: the first moment's decay
    beta_2: float  # FedAdam, FedYogi: the second moment's decay
    tau: float  # FedAdam, FedYogi, FedAdagrad: added to √v, bounds the step where v is small
    proximal_mu: float  # FedProx: the weight of (μ/2)·||w - w_global||² in each node's loss

    def __post_init__(self) -> None:
        _require(self, "name", self.name in STRATEGIES, f"allowed: {', '.join(STRATEGIES)}")
        _require(self, "fraction_train", 0 < self.fraction_train <= 1, "allowed: 0 < fraction <= 1")
        _require(self, "min_train_nodes", self.min_train_nodes >= 1, "must be >= 1")
        _require(self, "round_timeout", self.round_timeout > 0, "seconds, must be > 0")
        _require(self, "server_learning_rate", 0 <= self.server_learning_rate < math.inf,
                 "must be > 0, or 0 for the strategy's default")  # fmt: skip
        _require(self, "server_momentum", 0 <= self.server_momentum < 1, "allowed: 0 <= momentum < 1")
        _require(self, "beta_1", 0 <= self.beta_1 < 1, "allowed: 0 <= beta < 1")
        _require(self, "beta_2", 0 <= self.beta_2 < 1, "allowed: 0 <= beta < 1")
        _require(self, "tau", 0 < self.tau < math.inf, "must be > 0 (it keeps the step finite where v = 0)")
        _require(self, "proximal_mu", 0 <= self.proximal_mu < math.inf, "must be >= 0")

    @property
    def has_server_optimizer(self) -> bool:
        return self.name in DEFAULT_SERVER_LEARNING_RATES

    @property
    def learning_rate(self) -> float:
        """The server step's η: as given, or the strategy's default."""
        return self.server_learning_rate or DEFAULT_SERVER_LEARNING_RATES.get(self.name, 1.0)


@dataclass(frozen=True)
class AggregationConfig:
    """How a round's weights move: the whole state per message, or group by group within a byte budget."""

    PREFIX: ClassVar[str] = "aggregation."
    mode: str  # layerwise | all_at_once
    max_message_mb: float  # layerwise: the most one message may carry (MiB, as ArrayRecord.count_bytes counts)
    window: int  # layerwise: group messages in flight per node, so a node's next group is waiting when it answers

    def __post_init__(self) -> None:
        _require(self, "mode", self.mode in AGGREGATION_MODES, f"allowed: {', '.join(AGGREGATION_MODES)}")
        _require(
            self, "max_message_mb", 0 < self.max_message_mb < math.inf, "MiB per message, must be > 0 and finite"
        )
        _require(self, "window", self.window >= 1, "group messages in flight per node, must be >= 1")

    @property
    def max_message_bytes(self) -> float:
        """The group budget: unbounded (one group) for all_at_once."""
        return self.max_message_mb * 2**20 if self.mode == "layerwise" else math.inf


@dataclass(frozen=True)
class ExchangeConfig:
    """What an adapter travels as: its weights (float32), or its change from the global model both ends hold
    in bfloat16 or int8 (weights/codec.py), up from the nodes and down from the server."""

    PREFIX: ClassVar[str] = "exchange."
    update_format: str  # float32 | bfloat16 | int8

    def __post_init__(self) -> None:
        _require(self, "update_format", self.update_format in UPDATE_FORMATS, f"allowed: {', '.join(UPDATE_FORMATS)}")

    @property
    def compressed(self) -> bool:
        return self.update_format != "float32"


@dataclass(frozen=True)
class DatasetConfig:
    """The instruction dataset, fixed per challenge by the leaderboard (``[tool.flwr.app.config.static]``)."""

    PREFIX: ClassVar[str] = "static.dataset."
    name: str  # a Hub id, a local .json/.jsonl/.parquet/.csv file, or 'builtin:<name>'
    format: str

    def __post_init__(self) -> None:
        _require(self, "name", bool(self.name.strip()), "a Hub id, a local data file or 'builtin:<name>'")
        _require(self, "format", self.format in DATASET_FORMATS, f"unknown challenge; allowed: {', '.join(DATASET_FORMATS)}")


@dataclass(frozen=True)
class PartitionConfig:
    """How ``static.dataset.name`` is split among the nodes that take a partition of it (research runs; the
    leaderboard's challenges are IID)."""

    PREFIX: ClassVar[str] = "partition."
    method: str  # iid | dirichlet | pathological | shard (label-skewed) | linear | square | exponential (size-skewed)
    by: str  # label-skewed methods: the column whose values are the labels, or a derived one (training/partitions.py)
    alpha: float  # dirichlet: the concentration; small values give each node few labels
    classes_per_node: int  # pathological: labels per node
    shards_per_node: int  # shard: shards per node

    def __post_init__(self) -> None:
        _require(self, "method", self.method in PARTITION_METHODS, f"allowed: {', '.join(PARTITION_METHODS)}")
        _require(self, "by", self.method not in LABEL_SKEWED or bool(self.by.strip()),
                 f"partition.method='{self.method}' splits by labels: name a column or a derived label")  # fmt: skip
        _require(self, "alpha", self.alpha > 0 and math.isfinite(self.alpha), "the Dirichlet concentration, must be > 0")
        _require(self, "classes_per_node", self.classes_per_node >= 1, "must be a positive integer")
        _require(self, "shards_per_node", self.shards_per_node >= 1, "must be a positive integer")


@dataclass(frozen=True)
class OutputConfig:
    PREFIX: ClassVar[str] = "output."
    dir: str

    @property
    def root(self) -> Path:
        """Absolute, because Flower runs the ServerApp in the SuperLink's working directory, not the app's."""
        return Path(self.dir).expanduser().resolve()


@dataclass(frozen=True)
class EvalConfig:
    """Federated evaluation: the global adapter's loss on a held-out share of each node's partition."""

    PREFIX: ClassVar[str] = "eval."
    every_round: int  # evaluate after every N-th round and after the last; 0: never
    fraction: float  # the share of each node's partition held out (never trained on) when evaluating

    def __post_init__(self) -> None:
        _require(self, "every_round", self.every_round >= 0, "rounds between evaluations, 0 for none")
        _require(self, "fraction", 0 < self.fraction < 1, "allowed: 0 < fraction < 1")

    def due(self, server_round: int, num_rounds: int) -> bool:
        """Whether the global model after ``server_round`` is evaluated."""
        return self.every_round > 0 and (server_round % self.every_round == 0 or server_round == num_rounds)


@dataclass(frozen=True)
class ProfileConfig:
    PREFIX: ClassVar[str] = "profile."
    enabled: bool  # record spans, memory and bytes per round and node into profile.jsonl


@dataclass(frozen=True)
class RunConfig:
    PREFIX: ClassVar[str] = ""
    preset: str
    resume_from: str  # a run directory or run id to continue from its last kept checkpoint; "" for a new run
    num_server_rounds: int
    model: ModelConfig
    train: TrainConfig
    strategy: StrategyConfig
    aggregation: AggregationConfig
    exchange: ExchangeConfig
    dataset: DatasetConfig
    partition: PartitionConfig
    output: OutputConfig
    eval: EvalConfig
    profile: ProfileConfig

    def __post_init__(self) -> None:
        _require(self, "num_server_rounds", self.num_server_rounds > 0, "must be a positive integer")
        if self.exchange.compressed and self.exchanges_full_weights:
            raise ConfigError("exchange.update-format", self.exchange.update_format,
                              "compresses adapters; a full-model aggregation-only run (max-steps=0, quantization=0) "
                              "exchanges its weights as stored: use float32")  # fmt: skip
        if self.eval.every_round and self.aggregation_only:
            raise ConfigError("eval.every-round", self.eval.every_round,
                              "an aggregation-only run (train.training-arguments.max-steps=0) trains nothing to evaluate")  # fmt: skip

    @property
    def aggregation_only(self) -> bool:
        """``max-steps=0``: no data, no tokenizer, no training; each node returns the weights it holds."""
        return self.train.training_arguments.max_steps == 0

    @property
    def exchanges_full_weights(self) -> bool:
        """An aggregation-only run of an unquantized model averages the model itself; everything else the adapter.

        Quantized weights cannot be averaged, and training adapts (and so exchanges) only the adapter.
        """
        return self.aggregation_only and self.model.quantization == 0


def _build(cls: type, flat: Mapping[str, Any], used: set[str]) -> Any:
    """Construct ``cls`` from the keys under its prefix, converting and type-checking each value."""
    hints = get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            values[field.name] = _build(kind, flat, used)
            continue
        key = _key(cls, field.name)
        if key not in flat:
            raise ConfigError(key, None, "missing from the run config")
        used.add(key)
        values[field.name] = _coerce(key, flat[key], kind)
    return cls(**values)


def _coerce(key: str, value: Any, kind: type) -> Any:
    # TOML writes 1 for 1.0 and users write "1e-4" in shells; accept what is unambiguous, reject the rest.
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(key, value, f"expected {kind.__name__}, got {type(value).__name__}")


def parse_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Turn Flower's flat ``context.run_config`` into a validated :class:`RunConfig` (presets applied)."""
    flat = resolve_preset(flat)
    used: set[str] = set()
    config = _build(RunConfig, flat, used)
    unknown = sorted(set(flat) - used)
    if unknown:
        raise ConfigError(unknown[0], flat[unknown[0]], "unknown key")
    return config


_parsed: dict[tuple[int, tuple[tuple[str, Any], ...]], RunConfig] = {}


def run_config_of(run_id: int, flat: Mapping[str, Any]) -> RunConfig:
    """:func:`parse_run_config` once per process and run: a node answers hundreds of messages per round.

    Keyed by the run and the flat values themselves, so a process that serves two runs (or a test that
    reuses a run id with another config) never gets a stale config.
    """
    key = (run_id, tuple(sorted(flat.items())))
    if key not in _parsed:
        _parsed.clear()  # one run at a time is the rule; keep none of the old
        _parsed[key] = parse_run_config(flat)
    return _parsed[key]


def to_flat_dict(config: Any) -> dict[str, Any]:
    """The inverse of :func:`parse_run_config`: flat dotted keys, for logs and the run directory."""
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            flat.update(to_flat_dict(value))
        else:
            flat[_key(config, field.name)] = value
    return flat
