"""Reading a profile back: damaged files give what is complete, unknown runs say where they were looked for."""

import json

import pytest

from flowertune_llm.cli import main as cli_main
from flowertune_llm.observe.profiling import PROFILE_FILE, Recorder
from flowertune_llm.observe.report import ProfileNotFound, find_run, load_profile, summarize

from conftest import record_a_round


def test_truncated_or_corrupt_profile_gives_what_is_complete_with_a_warning(tmp_path):
    recorder = Recorder("server", tmp_path / PROFILE_FILE)
    record_a_round(recorder, 1)
    record_a_round(recorder, 2)
    recorder.close()
    path = tmp_path / PROFILE_FILE
    text = path.read_text()
    lines = text.splitlines()
    lines.insert(2, "{not json")
    path.write_text("\n".join(lines) + "\n" + '{"kind": "span", "name": "rou')  # killed mid-line
    profile = load_profile(path)
    assert len(profile.warnings) == 2 and all("unreadable line" in w for w in profile.warnings)
    assert [r["round"] for r in summarize(profile.events)["rounds"]] == [1, 2]


def test_unknown_run_says_where_it_looked(tmp_path, capsys):
    with pytest.raises(ProfileNotFound, match=f"looked for 42/{PROFILE_FILE} under {tmp_path}"):
        find_run("42", [tmp_path])
    assert cli_main(["profile", "42", "--output-dir", str(tmp_path)]) == 2
    assert "no run '42'" in capsys.readouterr().err


def test_unprofiled_run_is_named(tmp_path):
    (tmp_path / "7").mkdir()
    with pytest.raises(ProfileNotFound, match="was not profiled: run it with profile.enabled=true"):
        find_run("7", [tmp_path])


def test_command_reads_a_damaged_profile_by_path(tmp_path, capsys):
    run_dir = tmp_path / "99"
    run_dir.mkdir()
    recorder = Recorder("server", run_dir / PROFILE_FILE)
    record_a_round(recorder, 1)
    recorder.close()
    with (run_dir / PROFILE_FILE).open("a") as f:
        f.write('{"kind": "mem')
    assert cli_main(["profile", str(run_dir), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and json.loads(captured.out)["rounds"][0]["round"] == 1
