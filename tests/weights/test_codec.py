"""Compressed updates: round-trip error bounds, bytes, and the same bits however a tensor is cut into rows."""

from __future__ import annotations

import pytest
import torch

from flowertune_llm.weights.codec import BLOCK, SCALE_SUFFIX, decode, encode, rebuild, wire_specs
from flowertune_llm.weights.tensors import TensorSpec


def change(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1e-3


def wire_bytes(wire):
    return sum(t.numel() * t.element_size() for t in wire.values())


def test_bfloat16_halves_the_bytes_and_rounds_each_value_to_nearest():
    d = change(16, 300)
    wire = encode("w", d, "bfloat16")
    assert wire["w"].dtype == torch.bfloat16 and wire_bytes(wire) == d.numel() * 2
    back = decode("w", wire, TensorSpec.of(d), "bfloat16")
    assert torch.equal(back, d.to(torch.bfloat16).float())
    assert ((back - d).abs() <= d.abs() * 2**-8).all()  # bf16 keeps 8 significant bits


@pytest.mark.parametrize("shape", [(16, 4096), (4096, 16), (7, 3, 70), (5, 200)])
def test_int8_is_within_half_a_step_of_each_blocks_scale(shape):
    d = change(*shape, seed=1)
    wire = encode("w", d, "int8")
    rows, columns = shape[0], d[0].numel()
    blocks = -(-columns // BLOCK)
    assert wire["w"].dtype == torch.int8 and wire["w"].shape == d.shape
    assert wire["w" + SCALE_SUFFIX].shape == (rows, blocks)
    assert wire_bytes(wire) == d.numel() + 4 * rows * blocks
    back = decode("w", wire, TensorSpec.of(d), "int8")
    flat, scales = (back - d).reshape(rows, columns).abs(), wire["w" + SCALE_SUFFIX]
    bound = scales.repeat_interleave(BLOCK, dim=1)[:, :columns] / 2
    assert (flat <= bound * (1 + 1e-6)).all()
    # Each block's largest value is exact up to its scale's rounding: the scale is absmax / 127.
    assert int(wire["w"].abs().max()) == 127


def test_int8_bytes_for_a_lora_pair_are_about_a_quarter_of_float32():
    a, b = change(16, 4096), change(4096, 16)
    total = wire_bytes(encode("a", a, "int8")) + wire_bytes(encode("b", b, "int8"))
    assert total / ((a.numel() + b.numel()) * 4) == pytest.approx((16 * 4096 + 16 * 64 * 4 + 4096 * 16 + 4096 * 4) / (2 * 16 * 4096 * 4))
    assert total / ((a.numel() + b.numel()) * 4) < 0.4


def test_vectors_travel_as_bfloat16_in_int8_mode():
    assert wire_specs("norm", TensorSpec((4096,), torch.float32), "int8") == {"norm": TensorSpec((4096,), torch.bfloat16)}
    assert wire_specs("x", TensorSpec((), torch.float32), "int8") == {"x": TensorSpec((), torch.bfloat16)}


def test_row_ranges_encode_to_the_rows_of_the_whole_tensor():
    """A tensor cut into row ranges (layer-wise groups) travels and rebuilds as the same bits as whole."""
    d = change(37, 130, seed=2)
    whole = encode("w", d, "int8")
    for start, stop in [(0, 10), (10, 29), (29, 37)]:
        part = encode("w[a:b]", d[start:stop], "int8")
        assert torch.equal(part["w[a:b]"], whole["w"][start:stop])
        assert torch.equal(part["w[a:b]" + SCALE_SUFFIX], whole["w" + SCALE_SUFFIX][start:stop])


def test_an_all_zero_block_is_zero_and_rebuild_adds_the_change_to_the_base():
    d = torch.zeros(3, 100)
    d[1, 70] = 0.5
    wire = encode("w", d, "int8")
    assert torch.equal(decode("w", wire, TensorSpec.of(d), "int8"), d)
    base = torch.full((3, 100), 2.0)
    assert torch.equal(rebuild(base, wire, "w", "int8"), base + d)


def test_a_malformed_update_is_named():
    d = change(4, 100)
    wire = encode("w", d, "int8")
    with pytest.raises(ValueError, match=r"w::scale: missing from an update in int8"):
        decode("w", {"w": wire["w"]}, TensorSpec.of(d), "int8")
    with pytest.raises(ValueError, match=r"w is float32\[4, 100\], expected int8\[4, 100\]"):
        decode("w", {**wire, "w": d}, TensorSpec.of(d), "int8")
