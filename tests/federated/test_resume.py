"""Resuming: the run found, a config that could not continue it refused by key, the last kept round, the new run set up."""

from __future__ import annotations

import json
import os
import random

import pytest

from flowertune_llm.config import ConfigError, to_flat_dict
from flowertune_llm.federated import resume

from conftest import make_config


def stopped_run(tmp_path, kept=(2,), partial=None, last_history_round=3):
    """A run directory as a run stopped in round 3 leaves it: kept checkpoints, history, maybe a half-written one."""
    source = tmp_path / "runs" / "111"
    config = to_flat_dict(make_config(**{"num-server-rounds": 4}))
    (source / "checkpoints").mkdir(parents=True)
    (source / "run_config.json").write_text(json.dumps(config))
    (source / "history.json").write_text(json.dumps([{"round": r, "learning_rate": 0.1, "bytes_down": r} for r in range(1, last_history_round + 1)]))
    rng = random.Random(5)
    for number in kept:
        checkpoint = source / "checkpoints" / f"round-{number}"
        checkpoint.mkdir()
        (checkpoint / "adapter_model.safetensors").write_bytes(b"weights-%d" % number)
        (checkpoint / resume.STATE_FILE).write_text(json.dumps({"round": number, "sampler": resume.sampler_state(rng)}))
    if partial:
        (source / "checkpoints" / partial).mkdir()
    return source, config


def test_a_run_is_found_by_path_or_by_id_under_the_output_directory(tmp_path):
    source, _ = stopped_run(tmp_path)
    assert resume.locate(str(source), tmp_path) == source.resolve()
    assert resume.locate("111", tmp_path / "runs") == source.resolve()
    with pytest.raises(ConfigError, match="no run directory there or under") as error:
        resume.locate("222", tmp_path / "runs")
    assert error.value.key == "resume-from"


@pytest.mark.parametrize("key, value", [("model.name", "builtin:small-llama"), ("model.lora.peft-lora-r", 8),
                                        ("num-server-rounds", 6), ("aggregation.mode", "all_at_once")])  # fmt: skip
def test_a_config_that_could_not_continue_the_run_is_refused_naming_the_key(tmp_path, key, value):
    source, previous = stopped_run(tmp_path)
    with pytest.raises(ConfigError, match="a resumed run must keep it") as error:
        resume.check_compatible(previous, {**previous, key: value}, source)
    assert error.value.key == key and f"`{key}`" in str(error.value)


def test_what_changes_how_but_not_what_a_run_computes_may_differ(tmp_path):
    source, previous = stopped_run(tmp_path)
    changed = {**previous, "output.dir": "/elsewhere", "profile.enabled": True, "strategy.round-timeout": 60.0,
               "aggregation.window": 4, "resume-from": str(source)}  # fmt: skip
    resume.check_compatible(previous, changed, source)


def test_the_last_round_with_its_state_is_the_one_resumed(tmp_path):
    source, _ = stopped_run(tmp_path, kept=(2, 4))
    (source / "checkpoints" / "round-4" / resume.STATE_FILE).unlink()  # killed after the weights, before the state
    assert resume.last_kept_round(source, 6) == 2
    with pytest.raises(ConfigError, match="already finished its 2 rounds"):
        resume.last_kept_round(source, 2)
    fresh, _ = stopped_run(tmp_path / "fresh", kept=())
    with pytest.raises(ConfigError, match="no kept checkpoint to continue from"):
        resume.last_kept_round(fresh, 4)


def test_the_new_run_gets_the_checkpoint_the_history_up_to_it_and_where_it_came_from(tmp_path):
    source, previous = stopped_run(tmp_path, partial=".round-3.partial-abc")
    new = tmp_path / "runs" / "222"
    start = resume.prepare(source, previous, 4, new)
    assert start.round == 2 and [r.round for r in start.history] == [1, 2]  # round 3's record is not kept
    assert (start.checkpoint / "adapter_model.safetensors").read_bytes() == b"weights-2"
    assert os.stat(start.checkpoint / "adapter_model.safetensors").st_ino == os.stat(
        source / "checkpoints" / "round-2" / "adapter_model.safetensors").st_ino  # a hard link, not a copy
    assert json.loads((new / resume.RESUMED_FROM).read_text())["round"] == 2
    assert not list((source / "checkpoints").glob(".round-*"))  # the stopped run's half-written round is gone
    rng = random.Random(0)
    resume.restore_sampler(rng, start.sampler)
    assert rng.random() == random.Random(5).random()
