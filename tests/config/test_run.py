import pytest

from flowertune_llm.config import ConfigError, default_run_config, parse_run_config, run_config_of, to_flat_dict
from flowertune_llm.training.models import build_peft_model, check_target_modules

from conftest import make_config


def test_defaults_are_the_flowertune_example():
    config = parse_run_config(default_run_config())
    assert config.model.name == "openlm-research/open_llama_3b_v2"
    assert config.model.quantization == 4
    assert (config.model.lora.peft_lora_r, config.model.lora.peft_lora_alpha) == (32, 64)
    assert config.model.lora.peft_lora_dropout == 0.075
    assert config.num_server_rounds == 100
    assert config.dataset.name == "flwrlabs/alpaca-gpt4"


def test_flat_round_trip():
    flat = default_run_config()
    assert to_flat_dict(parse_run_config(flat)) == flat


def test_numbers_are_coerced_where_unambiguous():
    config = make_config(**{"train.learning-rate-max": 1, "strategy.round-timeout": "90"})
    assert config.train.learning_rate_max == 1.0
    assert config.strategy.round_timeout == 90.0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.quantization", 3, "allowed: 0, 4, 8"),
        ("model.dtype", "float8", "allowed: float32, bfloat16, float16"),
        ("strategy.fraction-train", 0.0, "0 < fraction <= 1"),
        ("strategy.fraction-train", 1.5, "0 < fraction <= 1"),
        ("model.lora.peft-lora-r", -1, "positive integer"),
        ("model.lora.peft-lora-r", 0, "positive integer"),
        ("model.lora.peft-lora-dropout", 1.0, "dropout < 1"),
        ("train.learning-rate-max", 1e-7, "must be >= train.learning-rate-min"),
        ("static.dataset.format", "poetry", "unknown challenge"),
        ("model.lora.target-modules", "q_proj,,v_proj", "comma-separated"),
        ("train.training-arguments.max-steps", -5, "or 0 for an aggregation-only run"),
        ("aggregation.mode", "per_layer", "allowed: layerwise, all_at_once"),
        ("aggregation.max-message-mb", 0, "must be > 0"),
        ("aggregation.window", 0, "must be >= 1"),
        ("eval.every-round", -1, "rounds between evaluations, 0 for none"),
        ("eval.fraction", 1.0, "allowed: 0 < fraction < 1"),
        ("num-server-rounds", 0, "positive integer"),
        ("model.quantization", "4", "expected int"),
        ("model.lora.use-dora", 1, "expected bool"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message) as error:
        make_config(**{key: value})
    assert error.value.key == key
    assert f"`{key}`" in str(error.value)


def test_aggregation_only_runs_of_an_unquantized_model_exchange_the_whole_model():
    full = make_config(**{"train.training-arguments.max-steps": 0, "model.quantization": 0})
    assert full.aggregation_only and full.exchanges_full_weights
    adapter = make_config(**{"train.training-arguments.max-steps": 0, "model.quantization": 4})
    assert adapter.aggregation_only and not adapter.exchanges_full_weights
    assert not make_config().aggregation_only
    assert make_config(**{"aggregation.mode": "all_at_once"}).aggregation.max_message_bytes == float("inf")
    assert make_config(**{"aggregation.max-message-mb": 2}).aggregation.max_message_bytes == 2 * 2**20


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="unknown key") as error:
        make_config(**{"model.lora.rank": 8})
    assert error.value.key == "model.lora.rank"


def test_missing_key_is_reported():
    flat = default_run_config()
    del flat["train.seed"]
    with pytest.raises(ConfigError, match="missing") as error:
        parse_run_config(flat)
    assert error.value.key == "train.seed"


def test_target_module_the_model_lacks_is_refused_before_loading():
    config = make_config(**{"model.lora.target-modules": "q_proj,qkv_proj"})
    with pytest.raises(ConfigError, match="no module named qkv_proj") as error:
        check_target_modules(config.model)
    assert error.value.key == "model.lora.target-modules"
    assert "gate_proj" in str(error.value)  # lists what the model does have


def test_existing_target_modules_pass_and_are_the_ones_adapted(tiny_config):
    assert check_target_modules(tiny_config.model) is None
    model = build_peft_model(tiny_config.model)
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"} == set(tiny_config.model.lora.target_module_names)


def test_the_cached_parse_is_one_per_run_and_values(monkeypatch):
    from flowertune_llm.config import presets

    flat = {**default_run_config(), "preset": "quickstart"}
    reads = []
    real = presets.load_preset
    monkeypatch.setattr(presets, "load_preset", lambda name: reads.append(name) or real(name))
    first = run_config_of(1, flat)
    assert run_config_of(1, dict(flat)) is first and reads == ["quickstart"]  # a node's 650 messages: one parse
    assert run_config_of(2, flat) is not first and reads == ["quickstart"] * 2  # a new run parses again
    changed = run_config_of(2, {**flat, "num-server-rounds": 3})
    assert changed.num_server_rounds == 3 and first.num_server_rounds == 8  # never a stale config


def test_evaluation_is_due_every_n_rounds_and_after_the_last():
    config = make_config(**{"num-server-rounds": 7, "eval.every-round": 3})
    assert [r for r in range(1, 8) if config.eval.due(r, 7)] == [3, 6, 7]
    assert not any(make_config().eval.due(r, 7) for r in range(1, 8))  # 0: off, the default


def test_an_aggregation_only_run_cannot_evaluate():
    with pytest.raises(ConfigError, match="trains nothing to evaluate") as error:
        make_config(**{"train.training-arguments.max-steps": 0, "eval.every-round": 1})
    assert error.value.key == "eval.every-round"
