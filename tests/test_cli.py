"""The ``flowertune-llm`` command and test.py: a broken adapter is named in one line, before a model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from flowertune_llm.cli import main

from conftest import APP_DIR


def adapter(tmp_path, truncate: int = 0, weights: bool = True):
    directory = tmp_path / "round-3"
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"base_model_name_or_path": "builtin:tiny-llama"}')
    if weights:
        save_file({"w": torch.ones(64)}, directory / "adapter_model.safetensors")
        data = (directory / "adapter_model.safetensors").read_bytes()
        (directory / "adapter_model.safetensors").write_bytes(data[: len(data) - truncate])
    return directory


@pytest.mark.parametrize("truncate, weights, message", [(10, True, "(truncated?)"), (0, False, "no adapter_model.safetensors")])
def test_chat_names_a_broken_adapter_in_one_line(tmp_path, capsys, truncate, weights, message):
    path = adapter(tmp_path, truncate, weights)
    assert main(["chat", "--peft-path", str(path), "--question", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and str(path) in err and "\n" not in err


def test_test_py_says_the_same_in_one_line(tmp_path):
    path = adapter(tmp_path, truncate=10)
    done = subprocess.run([sys.executable, str(APP_DIR / "test.py"), "--peft-path", str(path), "--question", "hi"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{path / 'adapter_model.safetensors'}:" in done.stderr
