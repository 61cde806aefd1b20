"""The baseline: a plain in-memory NumPy weighted mean, ``sum_k fp32(w_k) * fp32(x_k) / fp32(sum_k w_k)``.

What a FedAvg written directly in NumPy computes (Flower's own ``aggregate`` does the same in float64 or
the input dtype). NumPy has no bfloat16, so bf16 tensors enter as their uint16 bit patterns and are
widened the plain way (shift into the high half of a float32) and rounded back to nearest-even by hand.
The benchmarks time it beside the app's layer-wise mean; the tests hold the app's result to its bits
(:func:`torch_weighted_mean` takes and gives torch tensors, bf16 included).
"""

from __future__ import annotations

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


def weighted_mean(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], bf16: bool = False
) -> dict[str, np.ndarray]:
    """Fold ``states`` in order; ``bf16=True`` reads uint16 arrays as bfloat16 bit patterns."""
    widen = bf16_to_f32 if bf16 else (lambda a: a.astype(np.float32, copy=False))
    sums = {key: np.zeros(value.shape, np.float32) for key, value in states[0].items()}
    for state, weight in zip(states, weights, strict=True):
        w = np.float32(weight)
        for key, acc in sums.items():
            acc += w * widen(state[key])
    total = np.float32(sum(weights))
    if bf16:
        return {key: f32_to_bf16(acc / total) for key, acc in sums.items()}
    return {key: (acc / total).astype(states[0][key].dtype) for key, acc in sums.items()}


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
