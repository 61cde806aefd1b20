"""The ``flwr`` CLI's config: one connection added or replaced, the rest of the file left as the user wrote it."""

from __future__ import annotations

import tomllib

import pytest

from flowertune_llm.deploy.cli_config import (
    default_connection,
    node_config_arg,
    remove_cli_connection,
    toml_value,
    write_cli_connection,
)

USERS_FILE = """# my connections
[superlink]
default = "prod"

[superlink.prod]
address = "prod.example.org:9093"
root-certificates = "/etc/flower/ca.crt"

[superlink.local-deployment]
address = "127.0.0.1:1"
insecure = true

[superlink.local-deployment.options]
num-supernodes = 3
"""


def test_a_connection_replaces_its_old_section_and_keeps_the_others(tmp_path):
    (tmp_path / "config.toml").write_text(USERS_FILE)
    write_cli_connection(tmp_path, "local-deployment", "127.0.0.1:9999", tmp_path / "ca.crt")
    text = (tmp_path / "config.toml").read_text()
    parsed = tomllib.loads(text)["superlink"]
    assert parsed["default"] == "prod" and parsed["prod"]["address"] == "prod.example.org:9093"
    assert parsed["local-deployment"] == {"address": "127.0.0.1:9999", "root-certificates": str(tmp_path / "ca.crt")}
    assert text.startswith("# my connections") and "127.0.0.1:1" not in text


def test_a_new_file_starts_as_flowers_and_can_make_the_connection_the_default(tmp_path):
    write_cli_connection(tmp_path, "harness", "127.0.0.1:5000", None, make_default=True)
    parsed = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert parsed["default"] == "harness" and parsed["harness"] == {"address": "127.0.0.1:5000", "insecure": True}
    assert "local" in parsed  # Flower's own default connection is kept


def test_values_are_quoted_as_flowers_command_line_reads_them():
    assert node_config_arg({"partition-id": 0, "dataset-path": "/data/it's.jsonl", "persistent-worker": False}) == (
        "partition-id=0 dataset-path=\"/data/it's.jsonl\" persistent-worker=false"
    )
    assert toml_value(0.5) == "0.5" and toml_value("x") == "'x'"
    with pytest.raises(ValueError, match="both kinds of quotes"):
        toml_value("it's \"both\"")


def test_a_connection_written_and_removed_again_leaves_the_file_as_it_was(tmp_path):
    (tmp_path / "config.toml").write_text(USERS_FILE)
    before = tomllib.loads(USERS_FILE)["superlink"]
    default = default_connection(tmp_path)
    write_cli_connection(tmp_path, "flowertune", "127.0.0.1:9999", None, make_default=True)
    assert default_connection(tmp_path) == "flowertune"
    remove_cli_connection(tmp_path, "flowertune", default)
    assert tomllib.loads((tmp_path / "config.toml").read_text())["superlink"] == before


def test_removing_the_default_connection_falls_back_to_flowers_local(tmp_path):
    write_cli_connection(tmp_path, "harness", "127.0.0.1:5000", None, make_default=True)
    remove_cli_connection(tmp_path, "harness", default_before="gone")
    parsed = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert parsed["default"] == "local" and "harness" not in parsed
