"""The baseline: a plain in-memory NumPy weighted mean, ``sum_k fp32(w_k) * fp32(x_k) / fp32(sum_k w_k)``.

What a FedAvg written directly in NumPy computes (Flower's own ``aggregate`` does the same in float64 or
the input dtype). NumPy has no bfloat16, so bf16 tensors enter as their uint16 bit patterns and are
widened the plain way (shift into the high half of a float32) and rounded back to nearest-even by hand.
The benchmarks time it beside the app's layer-wise mean; the tests hold the app's result to its bits
(:func:`torch_weighted_mean` takes and gives torch tensors, bf16 included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even, as torch's ``.to(torch.bfloat16)`` does (inputs here are finite)."""
    bits = values.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def float_mean(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], bf16: bool = False
) -> dict[str, np.ndarray]:
    """The weighted mean in float32, before any rounding to the tensors' dtype (what a server optimizer steps
    with); ``bf16=True`` reads uint16 arrays as bfloat16 bit patterns."""
    widen = bf16_to_f32 if bf16 else (lambda a: a.astype(np.float32, copy=False))
    sums = {key: np.zeros(value.shape, np.float32) for key, value in states[0].items()}
    for state, weight in zip(states, weights, strict=True):
        w = np.float32(weight)
        for key, acc in sums.items():
            acc += w * widen(state[key])
    total = np.float32(sum(weights))
    return {key: acc / total for key, acc in sums.items()}


def weighted_mean(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], bf16: bool = False
) -> dict[str, np.ndarray]:
    """Fold ``states`` in order; ``bf16=True`` reads uint16 arrays as bfloat16 bit patterns."""
    means = float_mean(states, weights, bf16)
    if bf16:
        return {key: f32_to_bf16(mean) for key, mean in means.items()}
    return {key: mean.astype(states[0][key].dtype) for key, mean in means.items()}


def torch_weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """:func:`weighted_mean` of torch states (float32, float16 or bfloat16, one dtype per key), as torch tensors."""
    first = states[0]
    result = {}
    for key, tensor in first.items():
        if tensor.dtype == torch.bfloat16:
            arrays = [{key: s[key].contiguous().view(torch.int16).numpy().view(np.uint16)} for s in states]
            bits = weighted_mean(arrays, weights, bf16=True)[key]
            result[key] = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
        else:
            arrays = [{key: s[key].contiguous().numpy()} for s in states]
            result[key] = torch.from_numpy(weighted_mean(arrays, weights)[key].copy())
    return result


# --- server optimizers: the formulas of flowertune_llm/weights/server_optimizers.py, in NumPy float32 ----------


def server_optimizer_step(kind: str, t: int, x: np.ndarray, mean: np.ndarray, state: Mapping[str, np.ndarray],
                          s: Mapping[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """One round of ``kind`` on one float32 array: the new weights and state. ``s`` holds learning_rate,
    momentum, beta_1, beta_2, tau."""
    f = np.float32
    if kind == "fedavgm":
        momentum = state["momentum"] * f(s["momentum"]) + (x - mean)
        return x - momentum * f(s["learning_rate"]), {"momentum": momentum}
    delta = mean - x
    m = state["m"] * f(s["beta_1"]) + delta * f(1 - s["beta_1"])
    squared = delta * delta
    rate = s["learning_rate"]
    if kind == "fedadam":
        v = state["v"] * f(s["beta_2"]) + squared * f(1 - s["beta_2"])
        rate = rate * math.sqrt(1 - s["beta_2"] ** (t + 1)) / (1 - s["beta_1"] ** (t + 1))
    elif kind == "fedyogi":
        v = state["v"] - (squared * f(1 - s["beta_2"])) * np.sign(state["v"] - squared)
    else:  # fedadagrad
        v = state["v"] + squared
    return x + (m * f(rate)) / (np.sqrt(v) + f(s["tau"])), {"m": m, "v": v}


def _as_float32(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: bf16_to_f32(v.contiguous().view(torch.int16).numpy().view(np.uint16)) if v.dtype == torch.bfloat16
            else v.numpy().astype(np.float32) for k, v in state.items()}  # fmt: skip


def server_optimizer_rounds(
    kind: str, settings: Mapping[str, float], start: Mapping[str, torch.Tensor],
    rounds_of_updates: Sequence[Sequence[Mapping[str, torch.Tensor]]], weights: Sequence[float],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # fmt: skip
    """The global model after the last round (in ``start``'s dtypes) and the state after it (``<state>.<name>``,
    float32), from NumPy alone: each round's float32 weighted mean, the step, the model stored in its dtype."""
    x = _as_float32(start)
    bf16 = {k for k, v in start.items() if v.dtype == torch.bfloat16}
    names = ("momentum",) if kind == "fedavgm" else ("m", "v")
    state = {name: {k: np.zeros_like(v) for k, v in x.items()} for name in names}
    for t, updates in enumerate(rounds_of_updates, start=1):
        mean = float_mean([_as_float32(u) for u in updates], weights)
        for key in x:
            new, per_key = server_optimizer_step(kind, t, x[key], mean[key], {n: state[n][key] for n in names}, settings)
            x[key] = bf16_to_f32(f32_to_bf16(new)) if key in bf16 else new.astype(start[key].numpy().dtype).astype(np.float32)
            for n in names:
                state[n][key] = per_key[n]
    model = {k: torch.from_numpy(f32_to_bf16(v).view(np.int16).copy()).view(torch.bfloat16) if k in bf16
             else torch.from_numpy(v.astype(start[k].numpy().dtype)) for k, v in x.items()}  # fmt: skip
    return model, {f"{n}.{k}": torch.from_numpy(v) for n, per in state.items() for k, v in per.items()}
