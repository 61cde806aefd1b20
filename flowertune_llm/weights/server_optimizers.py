"""Server optimizers on the pseudo-gradient (FedAvgM, FedAdam, FedYogi, FedAdagrad), one piece at a time.

Each round's weighted mean ``x̄`` of the updates is not the new global model ``x`` but a step from it: with
``Δ = x̄ - x``, per element, in float32, in this order (one IEEE rounding per operation)::

    FedAvgM     p = x - x̄;  mom = μ·mom + p;  x' = x - η·mom
    FedAdam     m = β1·m + (1-β1)·Δ;  v = β2·v + (1-β2)·Δ²;           x' = x + (η_t·m) / (√v + τ)
    FedYogi     m as FedAdam;         v = v - ((1-β2)·Δ²)·sign(v - Δ²);  x' = x + (η·m) / (√v + τ)
    FedAdagrad  m as FedAdam;         v = v + Δ²;                        x' = x + (η·m) / (√v + τ)

with ``m``, ``v`` and ``mom`` starting at zero and FedAdam's bias-corrected rate
``η_t = η·√(1-β2^(t+1)) / (1-β1^(t+1))`` in round ``t``. These are Flower's classes
(``flwr.serverapp.strategy`` 1.42: fedavgm.py, fedadam.py, fedyogi.py, fedadagrad.py), formula for formula,
after Reddi et al. 2021 ("Adaptive Federated Optimization") and Hsu et al. 2019 (FedAvgM). Two differences,
both on purpose: FedAdagrad takes ``β1`` from the config (Reddi et al.'s Algorithm 2 has momentum; Flower
fixes it at 0, which ``strategy.beta-1=0`` reproduces), and everything stays float32 (Flower's FedAdam
turns float32 arrays into float64 through its NumPy ``η_t``; the difference is below float32 resolution).

Why per element, never fused, and a correctly rounded square root: every element's result then depends on
its own inputs only and on IEEE arithmetic, so the same bits come out however the model is cut into groups
or row ranges (layer-wise = all-at-once) and on any CPU, and the tests hold them to a NumPy reference bit
for bit.

Memory: the state (``m`` and ``v``, or ``mom``; float32, one per weight) never sits in server memory. The
previous round's is read through mmap from ``server_optimizer/`` inside the previous checkpoint, the new
one written row block by row block into ``server_optimizer/`` of the round's checkpoint as each group
completes; at any moment the server holds a few 4 MiB blocks on top of what FedAvg holds. It costs disk:
the state is 4 or 8 bytes per weight per kept round (FedAdam on a bf16 model: 4x the checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowertune_llm.weights.local_checkpoint import LocalCheckpoint
from flowertune_llm.weights.shards import DEFAULT_MAX_SHARD_BYTES, ShardedCheckpointWriter, StoreInsideCheckpoint
from flowertune_llm.weights.tensors import Piece, TensorSpec

SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
STATE_DIR = "server_optimizer"  # inside each checkpoint directory: the state after that round
STATE_FILENAME_PATTERN = "state{suffix}.safetensors"
# Elements per block: the scratch of one step is a handful of blocks (4 MiB each in float32).
_BLOCK = 1 << 20


def _f32(value: float) -> float:
    """``value`` rounded to float32 once, as NumPy's ``np.float32(value)``: every constant of the step."""
    return float(torch.tensor(value, dtype=torch.float32))


def _sqrt(values: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root (IEEE 754, the CPU's sqrt instruction, through NumPy).

    torch's CPU sqrt is not: on this project's machines (AVX2 and AVX-512) ~15-20% of float32 results are
    one ulp off the correctly rounded value (measured over 1M values against NumPy), so results would depend
    on torch's build and the CPU it dispatches for.
    """
    values = values.contiguous()
    return torch.from_numpy(np.sqrt(values.numpy()))


@dataclass(frozen=True)
class ServerOptimizer:
    """One server optimizer and its hyper-parameters (``strategy.*``; defaults in pyproject.toml)."""

    kind: str  # one of SERVER_OPTIMIZERS
    learning_rate: float  # η
    momentum: float  # μ, FedAvgM
    beta_1: float  # FedAdam, FedYogi, FedAdagrad
    beta_2: float  # FedAdam, FedYogi
    tau: float  # FedAdam, FedYogi, FedAdagrad: the adaptivity floor added to √v

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.kind!r}; allowed: {', '.join(SERVER_OPTIMIZERS)}")

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("momentum",) if self.kind == "fedavgm" else ("m", "v")

    def state_specs(self, specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """The state's tensors: ``<state>.<weight name>``, float32, the weight's shape."""
        return {
            f"{state}.{name}": TensorSpec(spec.shape, torch.float32) for state in self.state_names for name, spec in specs.items()
        }

    def rate(self, server_round: int) -> float:
        """The step size of ``server_round``: FedAdam's bias correction as Flower computes it (exponent t + 1)."""
        if self.kind != "fedadam":
            return self.learning_rate
        return self.learning_rate * math.sqrt(1 - self.beta_2 ** (server_round + 1.0)) / (1 - self.beta_1 ** (server_round + 1.0))

    def step(self, server_round: int, x: torch.Tensor, mean: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One block: ``x`` the global weights and ``mean`` the round's mean (both float32; ``mean`` is overwritten
        with the new weights), ``state`` the previous state's blocks (zeros in the first round). Returns the
        new state's blocks."""
        rate = _f32(self.rate(server_round))
        if self.kind == "fedavgm":
            pseudo_gradient = torch.sub(x, mean)
            momentum = state["momentum"].mul(_f32(self.momentum)).add_(pseudo_gradient)
            torch.sub(x, momentum.mul(rate), out=mean)
            return {"momentum": momentum}
        delta = mean.sub_(x)  # Δ, in the mean's buffer
        m = state["m"].mul(_f32(self.beta_1)).add_(delta.mul(_f32(1 - self.beta_1)))
        squared = delta.mul(delta)
        if self.kind == "fedadam":
            v = state["v"].mul(_f32(self.beta_2)).add_(squared.mul_(_f32(1 - self.beta_2)))
        elif self.kind == "fedyogi":
            sign = torch.sign(state["v"].sub(squared))
            v = state["v"].sub(squared.mul_(_f32(1 - self.beta_2)).mul_(sign))
        else:  # fedadagrad
            v = state["v"].add(squared)
        scaled = m.mul(rate).div_(_sqrt(v).add_(_f32(self.tau)))
        torch.add(x, scaled, out=mean)
        return {"m": m, "v": v}

    def writer(self, directory: Path, specs: Mapping[str, TensorSpec]) -> ShardedCheckpointWriter:
        """A writer of the state after a round, into ``directory`` (``server_optimizer/`` of its checkpoint)."""
        return ShardedCheckpointWriter(
            directory, self.state_specs(specs), max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, filename_pattern=STATE_FILENAME_PATTERN
        )

    def state_bytes(self, specs: Mapping[str, TensorSpec]) -> int:
        return sum(spec.nbytes for spec in self.state_specs(specs).values())


class OptimizerRound(StoreInsideCheckpoint):
    """A server optimizer applied to one round's means, piece by piece, as streaming_fedavg's ``apply``.

    Reads the global model before the round (``current``) and the state after the previous round
    (``previous``, None before the first) through mmap; writes the new state inside the round's checkpoint
    (:meth:`open_inside`), committed with it, and dropped with it when the round restarts.
    """

    DIRECTORY = STATE_DIR

    def __init__(self, optimizer: ServerOptimizer, server_round: int, specs: Mapping[str, TensorSpec],
                 current: LocalCheckpoint, previous: LocalCheckpoint | None):  # fmt: skip
        super().__init__()
        self.optimizer, self.server_round, self.specs = optimizer, server_round, dict(specs)
        self.current, self.previous = current, previous

    def _writer_for(self, directory: Path) -> ShardedCheckpointWriter:
        return self.optimizer.writer(directory, self.specs)  # the state, in ``server_optimizer/``

    def __call__(self, key: str, mean: torch.Tensor) -> torch.Tensor:
        """The new global weights of piece ``key`` in its dtype, from its float32 ``mean`` (overwritten)."""
        self._open_writer()
        piece = Piece.parse(key)
        spec = self.specs[piece.name]
        current = self.current.tensor(piece)
        if mean.dim() == 0:  # a scalar: one block, no rows
            self._step_block(piece.name, None, current, mean)
            return mean.to(spec.dtype)
        first = piece.rows[0] if piece.rows else 0
        rows = mean.shape[0]
        per_block = max(1, _BLOCK // max(1, mean[0].numel()))
        result = mean if spec.dtype == torch.float32 else torch.empty(mean.shape, dtype=spec.dtype)
        for start in range(0, rows, per_block):
            stop = min(start + per_block, rows)
            block = mean[start:stop]
            self._step_block(piece.name, (first + start, first + stop), current[start:stop], block)
            if result is not mean:
                result[start:stop].copy_(block)  # round to nearest even, as .to()
        return result

    def _step_block(self, name: str, rows: tuple[int, int] | None, current: torch.Tensor, mean: torch.Tensor) -> None:
        x = current.to(torch.float32, copy=True)  # exact widening; a copy, never a write into the mapped file
        state = {}
        for state_name in self.optimizer.state_names:
            stored = Piece(f"{state_name}.{name}", rows)
            state[state_name] = self.previous.tensor(stored) if self.previous is not None else torch.zeros_like(x)
        new_state = self.optimizer.step(self.server_round, x, mean, state)
        writer = self._open_writer()
        for state_name, values in new_state.items():
            writer.write(Piece(f"{state_name}.{name}", rows), values)


def previous_state(checkpoint: Path | None) -> Path | None:
    """The state saved with ``checkpoint`` (the global model before a round), if there is one."""
    if checkpoint is None:
        return None
    directory = checkpoint / STATE_DIR
    return directory if directory.is_dir() else None
