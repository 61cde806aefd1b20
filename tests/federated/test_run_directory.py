"""The run directory: the resolved config, the history and its plot, rewritten whole each round."""

import json

from flowertune_llm.federated.run_directory import RunDirectory


def test_a_run_directory_holds_its_config_history_and_plot(tmp_path):
    run_dir = RunDirectory.create(tmp_path / "runs", 42, {"num-server-rounds": 2, "output.dir": str(tmp_path)})
    assert run_dir.path == tmp_path / "runs" / "42"
    assert json.loads((run_dir.path / "run_config.json").read_text())["num-server-rounds"] == 2
    assert run_dir.checkpoint_dir(3) == run_dir.path / "checkpoints" / "round-3"
    rounds = [{"round": 1, "learning_rate": 1e-3, "train_loss": 2.5}, {"round": 2, "learning_rate": 5e-4, "train_loss": 2.1}]
    run_dir.save_history(rounds[:1])
    run_dir.save_history(rounds)
    assert json.loads((run_dir.path / "history.json").read_text()) == rounds
    assert (run_dir.path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in run_dir.path.iterdir()) == ["history.json", "loss.png", "run_config.json"]


def test_aggregation_only_runs_plot_the_schedule_without_a_loss(tmp_path):
    run_dir = RunDirectory.create(tmp_path, 7, {})
    run_dir.save_history([{"round": 1, "learning_rate": 1e-3, "train_loss": None}])
    assert (run_dir.path / "loss.png").stat().st_size > 1000


def test_the_loss_plot_marks_whole_rounds_only(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k))[1])
    run_dir = RunDirectory.create(tmp_path, 7, {})
    run_dir.save_history([{"round": r, "learning_rate": 1e-3, "train_loss": 3.0 - r / 10} for r in (1, 2, 3)])
    (loss_axis, _) = saved[-1].axes
    visible = [t for t in loss_axis.get_xticks() if loss_axis.get_xlim()[0] <= t <= loss_axis.get_xlim()[1]]
    assert visible and all(float(t).is_integer() for t in visible)  # not 1.25, 1.5, ...
