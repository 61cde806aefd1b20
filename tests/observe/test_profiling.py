"""Recording spans, memory and messages: events nest, add up, and reach the file as they happen."""

import json

import pytest

from flowertune_llm.observe.profiling import OFF, PROFILE_FILE, Recorder
from flowertune_llm.observe.report import summarize

from conftest import record_a_round


def test_spans_nest_and_add_up(tmp_path):
    recorder = Recorder("server", tmp_path / PROFILE_FILE)
    record_a_round(recorder, 1)
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
