"""The run directory: every file a run writes, each written to a temporary name and then renamed (atomic.py).

    <output.dir>/<run_id>/
        run_config.json          the resolved config the run used
        history.json             one record per round: loss (train and held out), learning rate, nodes,
                                 failures, bytes, seconds
        loss.png                 train and held-out loss and the learning rate across rounds
        checkpoints/round-<N>/   the global weights after round N, written by the round loop as it averages:
                                 adapter_model.safetensors + adapter_config.json (a standard PEFT adapter),
                                 or a full model's sharded model-*.safetensors + index + config.json
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowertune_llm.atomic import atomic_path, write_json


class RunDirectory:
    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, output_root: Path, run_id: int | str, resolved_config: Mapping[str, Any]) -> RunDirectory:
        run_dir = cls(output_root / str(run_id))
        run_dir.path.mkdir(parents=True, exist_ok=True)
        write_json(run_dir.path / "run_config.json", dict(resolved_config))
        return run_dir

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round}"

    def save_history(self, rounds: list[dict[str, Any]]) -> None:
        write_json(self.path / "history.json", rounds)
        self._plot_loss(rounds)

    def _plot_loss(self, rounds: list[dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        trained = [r for r in rounds if r["train_loss"] is not None]
        evaluated = [r for r in rounds if r.get("eval_loss") is not None]
        fig, loss_axis = plt.subplots(figsize=(6, 3.5), dpi=120)
        loss_axis.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], "o-", color="tab:blue", label="train")
        if evaluated:
            loss_axis.plot([r["round"] for r in evaluated], [r["eval_loss"] for r in evaluated], "s-", color="tab:orange",
                           label="held out")  # fmt: skip
            loss_axis.legend(loc="upper right", fontsize=8)
        loss_axis.set_xlabel("round")
        loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole: no 1.25
        loss_axis.set_ylabel("loss (weighted mean over nodes)", color="tab:blue")
        lr_axis = loss_axis.twinx()
        lr_axis.plot([r["round"] for r in rounds], [r["learning_rate"] for r in rounds], "--", color="tab:gray")
        lr_axis.set_ylabel("learning rate", color="tab:gray")
        loss_axis.set_title(f"run {self.path.name}")
        fig.tight_layout()
        with atomic_path(self.path / "loss.png") as scratch:
            fig.savefig(scratch, format="png")
        plt.close(fig)
