"""Recording spans and reading profiles back, including damaged files and unknown runs."""

import json
import time

import pytest

from flowertune_llm.cli import main as cli_main
from flowertune_llm.profile_report import ProfileNotFound, find_run, load_profile, summarize
from flowertune_llm.profiling import OFF, PROFILE_FILE, Recorder


def _record_round(recorder: Recorder, server_round: int) -> None:
    recorder.round = server_round
    with recorder.span("round"):
        with recorder.span("configure"):
            time.sleep(0.01)
        recorder.emit({"kind": "message", "node": 5, "direction": "down", "bytes": 1000})
        recorder.record_span("wait", 0.05, time.time())
        time.sleep(0.05)
        recorder.emit({"kind": "arrival", "node": 5, "order": 1, "seconds": 0.04})
        recorder.emit({"kind": "arrival", "node": 6, "order": 2, "seconds": 0.05})
        recorder.emit({"kind": "message", "node": 5, "direction": "up", "bytes": 1000})
        with recorder.span("aggregate"):
            time.sleep(0.01)
    recorder.memory()


def test_spans_nest_and_add_up(tmp_path):
    recorder = Recorder("server", tmp_path / PROFILE_FILE)
    _record_round(recorder, 1)
    recorder.close()
    spans = {e["name"]: e for e in recorder.events if e["kind"] == "span"}
    assert spans["round"]["parent"] is None
    assert {spans[n]["parent"] for n in ("configure", "wait", "aggregate")} == {"round"}
    row = summarize(recorder.events)["rounds"][0]
    assert 0.9 <= row["coverage"] <= 1.0
    assert row["bytes_down"] == 1000 and row["bytes_up"] == 1000
    assert row["straggler_wait_seconds"] == pytest.approx(0.01)
    assert row["server_peak_rss_mb"] > 0
    # Every event reached the file as it happened, one line each.
    lines = (tmp_path / PROFILE_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == recorder.events


def test_profiling_off_records_nothing():
    with OFF.span("train") as span:
        span["steps"] = 10
    OFF.memory()
    OFF.record_span("wait", 1.0, 0.0)
    assert OFF.events == [] and not OFF.enabled


def test_truncated_or_corrupt_profile_gives_what_is_complete_with_a_warning(tmp_path):
    recorder = Recorder("server", tmp_path / PROFILE_FILE)
    _record_round(recorder, 1)
    _record_round(recorder, 2)
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
    _record_round(recorder, 1)
    recorder.close()
    with (run_dir / PROFILE_FILE).open("a") as f:
        f.write('{"kind": "mem')
    assert cli_main(["profile", str(run_dir), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and json.loads(captured.out)["rounds"][0]["round"] == 1
