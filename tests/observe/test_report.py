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


def test_the_timeline_numbers_both_panels_colours_each_part_apart_and_draws_gpu_memory(tmp_path, monkeypatch):
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    from flowertune_llm.observe import report

    colours = [to_rgb(c) for c in report._COLORS.values()]
    assert len(set(colours)) == len(colours)  # every part its own colour
    adapter_in, adapter_out = to_rgb(report._COLORS["adapter_in"]), to_rgb(report._COLORS["adapter_out"])
    assert sum((a - b) ** 2 for a, b in zip(adapter_in, adapter_out)) ** 0.5 > 0.5  # far apart, not two blues alike

    saved: list[Figure] = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k))[1])
    start = 1000.0
    events = [
        {"kind": "span", "node": "server", "round": 1, "name": "configure", "start": start, "seconds": 0.1},
        {"kind": "span", "node": 5, "round": 1, "name": "adapter_in", "start": start + 0.2, "seconds": 0.1},
        {"kind": "span", "node": 5, "round": 1, "name": "train", "start": start + 0.3, "seconds": 1.0},
        {"kind": "span", "node": 5, "round": 1, "name": "adapter_out", "start": start + 1.3, "seconds": 0.1},
        {"kind": "memory", "node": 5, "round": 1, "time": start + 1.4, "process": "worker", "rss_mb": 600.0,
         "peak_rss_mb": 630.0, "gpu_allocated_mb": 6500.0, "gpu_reserved_mb": 7000.0},
        {"kind": "memory", "node": 5, "round": 1, "time": start + 1.5, "process": "clientapp", "rss_mb": 120.0,
         "peak_rss_mb": 127.0, "gpu_allocated_mb": None, "gpu_reserved_mb": None},
    ]  # fmt: skip
    report.plot(events, tmp_path / "timeline.png")
    timeline, memory = saved[-1].axes
    saved[-1].canvas.draw()
    assert any(label.get_visible() and label.get_text() for label in timeline.get_xticklabels())  # numbers on top too
    labels = [line.get_label() for line in memory.get_lines()]
    assert "5 worker GPU peak reserved" in labels and "5 worker peak RSS" in labels and "5 clientapp peak RSS" in labels
    assert "5 clientapp GPU peak reserved" not in labels  # no GPU: no line, not a line at 0
