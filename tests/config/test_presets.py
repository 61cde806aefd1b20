"""Every preset under ``configs/``: it loads the way Flower loads a ``--run-config`` file, it validates, it gives
the same run through ``preset='<name>'``, its header documents a command that works, it follows the
FlowerTune challenge it is filed under, and its LoRA target modules exist in its architecture.

Offline and fast: architectures are checked on skeletons built from small configs of the same class,
on the meta device, through the app's own ``check_target_modules``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args
from transformers import LlamaConfig, Phi3Config, PretrainedConfig, xLSTMConfig

from flowertune_llm.config import (
    ConfigError,
    RunConfig,
    default_run_config,
    parse_run_config,
    to_flat_dict,
)
from flowertune_llm.config.presets import APP_ROOT, PRESETS_DIR
from flowertune_llm.training.models import check_target_modules

PRESET_FILES = sorted(PRESETS_DIR.rglob("*.toml"))
# Recipes are filed torchtune-style as configs/<challenge>/<model>_<method>_<quant>.toml;
# files directly under configs/ (the quickstart) are not leaderboard recipes.
RECIPE_FILES = [p for p in PRESET_FILES if p.parent != PRESETS_DIR]

# What the leaderboard fixes per challenge (its FlowerTune app templates): dataset, prompt format and the
# number of SuperNodes the dataset is partitioned into.
CHALLENGES = {
    "general-nlp": ("flwrlabs/alpaca-gpt4", "general-nlp", 20),
    "finance": ("flwrlabs/fingpt-sentiment-train", "finance", 50),
    "medical": ("flwrlabs/medical-meadow-medical-flashcards", "medical", 20),
    "code": ("flwrlabs/code-alpaca-20k", "code", 10),
}
LEADERBOARD_SEQ_LENGTH = 512
FILE_NAME = re.compile(r"^(?P<model>[a-z0-9.\-]+)_(?P<method>lora|dora)_(?P<quant>4bit|8bit|bf16|fp16|fp32)$")


def preset_name(path: Path) -> str:
    return path.relative_to(PRESETS_DIR).with_suffix("").as_posix()


def ids(paths: list[Path]) -> list[str]:
    return [preset_name(p) for p in paths]


def flower_defaults() -> dict:
    """The app's config exactly as Flower flattens it from pyproject.toml."""
    with (APP_ROOT / "pyproject.toml").open("rb") as f:
        return flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def flower_run_config(*run_config: str) -> dict:
    """What the app receives from ``flwr run . --run-config ...``: Flower's own parsing and merging.

    ``fuse_dicts`` raises ``ValueError`` on a key the app does not declare, as ``flwr run`` does.
    """
    return fuse_dicts(flower_defaults(), parse_config_args(list(run_config)))


def header(path: Path) -> str:
    """The comment block a preset starts with."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return "\n".join(lines)


@functools.cache
def from_file(path: Path) -> RunConfig:
    """The run ``flwr run . --run-config <path>`` starts (cached: one bad preset fails only its own tests)."""
    return parse_run_config(flower_run_config(str(path)))


def test_every_challenge_has_recipes_and_every_recipe_a_challenge():
    assert {p.parent.name for p in RECIPE_FILES} == set(CHALLENGES), ids(RECIPE_FILES)


def test_default_run_config_is_what_flower_reads():
    assert default_run_config() == flower_defaults()


# --- loading and validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PRESET_FILES, ids=ids(PRESET_FILES))
def test_preset_file_loads_as_flower_loads_it(path):
    overrides = parse_config_args([str(path)])
    unknown = sorted(set(overrides) - set(flower_defaults()))
    assert not unknown, f"{preset_name(path)}: keys not in [tool.flwr.app.config], Flower would refuse them: {unknown}"

    config = parse_run_config(flower_run_config(str(path)))

    # Every key the preset sets reaches the typed config unchanged.
    flat = to_flat_dict(config)
    assert {key: flat[key] for key in overrides} == overrides
    assert config.preset == ""


@pytest.mark.parametrize("path", PRESET_FILES, ids=ids(PRESET_FILES))
def test_preset_by_name_is_the_same_run(path):
    name = preset_name(path)
    by_name = parse_run_config(flower_run_config(f"preset='{name}'"))
    assert by_name.preset == name
    assert dataclasses.replace(by_name, preset="") == from_file(path)


@pytest.mark.parametrize("path", PRESET_FILES, ids=ids(PRESET_FILES))
def test_explicit_override_beats_the_preset(path):
    # Values that differ from both the app default and every preset's own value.
    config = parse_run_config(
        flower_run_config(f"preset='{preset_name(path)}' num-server-rounds=3 train.learning-rate-max=1e-3 train.seed=7")
    )
    assert config.num_server_rounds == 3
    assert config.train.learning_rate_max == 1e-3
    assert config.train.seed == 7
    expected = from_file(path)
    expected = dataclasses.replace(
        expected,
        preset=preset_name(path),
        num_server_rounds=3,
        train=dataclasses.replace(expected.train, learning_rate_max=1e-3, seed=7),
    )
    assert config == expected


def test_bad_preset_name_lists_the_available_ones():
    with pytest.raises(ConfigError) as error:
        parse_run_config(flower_run_config("preset='finance/no-such-model_lora_4bit'"))
    assert error.value.key == "preset"
    message = str(error.value)
    assert "finance/no-such-model_lora_4bit" in message
    for path in PRESET_FILES:
        assert preset_name(path) in message


def test_unknown_key_in_a_preset_file_is_refused(tmp_path):
    bad = tmp_path / "typo.toml"
    bad.write_text("[train]\nlearning-rate = 1e-4\n")
    with pytest.raises(ValueError, match="train.learning-rate"):
        flower_run_config(str(bad))  # flwr run refuses the file itself
    with pytest.raises(ConfigError) as error:
        parse_run_config(flower_run_config(f"preset='{bad}'"))  # and so does the app when it is named as a preset
    assert error.value.key == "train.learning-rate"


# --- recipes: documented commands and the challenge protocol ------------------------------------------------


def _federation(config_string: str) -> dict:
    return dict(pair.split("=", 1) for pair in config_string.split())


@pytest.mark.parametrize("path", RECIPE_FILES, ids=ids(RECIPE_FILES))
def test_header_documents_working_commands(path):
    text = header(path)
    name = preset_name(path)
    assert "Source:" in text, f"{name}: say which recipe this reproduces"

    run = re.search(r'flwr run \. --run-config (\S+) --federation-config "([^"]+)"', text)
    assert run, f"{name}: no `flwr run . --run-config configs/... --federation-config \"...\"` line"
    assert run[1] == f"configs/{name}.toml"
    federation = _federation(run[2])
    assert set(federation) == {"num-supernodes", "client-resources-num-cpus", "client-resources-num-gpus"}
    supernodes = int(federation["num-supernodes"])
    int(federation["client-resources-num-cpus"])  # Flower refuses a fractional CPU count
    assert 0 < float(federation["client-resources-num-gpus"]) <= 1
    assert f"SuperNodes: {supernodes}" in text
    assert re.search(rf"GPU share {re.escape(federation['client-resources-num-gpus'])}\b", text), "say why this share"

    # The preset='...' alternative: same federation, and it parses to the file's run plus its overrides.
    alternative = re.search(r"""flwr run \. --run-config "(preset='([^']+)'[^"]*)" --federation-config "([^"]+)\"""", text)
    assert alternative, f"{name}: no `--run-config \"preset='{name}' ...\"` line"
    assert alternative[2] == name
    assert alternative[3] == run[2]
    via_name = parse_run_config(flower_run_config(alternative[1]))
    overrides = parse_config_args([alternative[1]])
    flat, expected = to_flat_dict(via_name), to_flat_dict(from_file(path))
    expected.update(overrides)
    assert flat == expected

    # The fraction, not the minimum node count, decides how many clients train per round.
    config = from_file(path)
    assert int(supernodes * config.strategy.fraction_train + 1e-9) >= config.strategy.min_train_nodes


@pytest.mark.parametrize("path", RECIPE_FILES, ids=ids(RECIPE_FILES))
def test_recipe_follows_its_challenge(path):
    config = from_file(path)
    challenge = path.parent.name
    assert challenge in CHALLENGES, f"file recipes under one of {sorted(CHALLENGES)}"
    dataset, dataset_format, supernodes = CHALLENGES[challenge]
    assert (config.dataset.name, config.dataset.format) == (dataset, dataset_format)
    assert config.train.seq_length == LEADERBOARD_SEQ_LENGTH
    run = re.search(r"num-supernodes=(\d+)", header(path))
    assert run and int(run[1]) == supernodes

    parts = FILE_NAME.match(path.stem)
    assert parts, f"{path.name}: expected <model>_<lora|dora>_<4bit|8bit|bf16|fp16|fp32>.toml"
    assert config.model.lora.use_dora == (parts["method"] == "dora")
    quant = f"{config.model.quantization}bit" if config.model.quantization else {
        "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"
    }[config.model.dtype]
    assert parts["quant"] == quant
    assert parts["model"] == config.model.name.rsplit("/", 1)[-1].lower().replace("_", "-")


# --- target modules against the architecture --------------------------------------------------------------

# A small config of the same architecture class per model family; PEFT and check_target_modules match module
# names by suffix, and the names do not depend on the sizes.
ARCHITECTURES: list[tuple[re.Pattern, callable]] = [
    (
        re.compile(r"open_llama|SmolLM2|^builtin:.*llama", re.IGNORECASE),
        lambda: LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        ),
    ),
    (
        re.compile(r"Phi-4-mini|Phi-3", re.IGNORECASE),  # Phi-4-mini is model_type phi3
        lambda: Phi3Config(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
    ),
    (
        re.compile(r"xLSTM", re.IGNORECASE),
        lambda: xLSTMConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=4),
    ),
]


# Aggregation-only presets of a whole model adapt nothing: no target modules to check.
TRAINING_PRESETS = [p for p in PRESET_FILES if not from_file(p).exchanges_full_weights]


def small_config_dir(model_name: str, directory: Path) -> Path:
    for pattern, make in ARCHITECTURES:
        if pattern.search(model_name):
            config: PretrainedConfig = make()
            config.save_pretrained(directory)
            return directory
    pytest.fail(f"no offline architecture for {model_name}; add a small config of its class to ARCHITECTURES")


@pytest.mark.parametrize("path", TRAINING_PRESETS, ids=ids(TRAINING_PRESETS))
def test_target_modules_exist_in_the_architecture(path, tmp_path):
    model = from_file(path).model
    assert model.lora.target_module_names, f"{preset_name(path)}: name the target modules the recipe trained"
    skeleton = dataclasses.replace(model, name=str(small_config_dir(model.name, tmp_path)))
    check_target_modules(skeleton)  # raises ConfigError naming a missing module


def _xlstm_with(targets: str, tmp_path: Path):
    path = PRESETS_DIR / "general-nlp" / "xlstm-7b_dora_4bit.toml"
    model = parse_run_config(flower_run_config(str(path))).model
    lora = dataclasses.replace(model.lora, target_modules=targets)
    return dataclasses.replace(model, name=str(small_config_dir(model.name, tmp_path)), lora=lora)


def test_xlstm_recipe_names_from_the_xlstm_package_do_not_exist_in_transformers(tmp_path):
    # The recipe's list as published: only proj_up and proj_down are module names in transformers' xLSTM.
    recipe = "proj_up,proj_down,q_proj,k_proj,v_proj,LinearHeadwiseExpand"
    with pytest.raises(ConfigError) as error:
        check_target_modules(_xlstm_with(recipe, tmp_path))
    assert "q_proj, k_proj, v_proj, LinearHeadwiseExpand" in str(error.value)


def test_xlstm_mlstm_projections_named_in_the_preset_comment_exist(tmp_path):
    check_target_modules(_xlstm_with("proj_up,proj_down,q,k,v", tmp_path))
