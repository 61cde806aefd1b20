"""A model cut into messages within a byte budget, as ``ArrayRecord.count_bytes()`` counts them."""

from __future__ import annotations

import math

import torch

from flowertune_llm.weights.groups import plan_groups
from flowertune_llm.weights.tensors import Piece, TensorSpec, specs_of
from flowertune_llm.weights.transport import (
    RECORD_OVERHEAD,
    encoded_size,
    from_record,
    to_record,
)

from conftest import bits, model_state, pieces_of, through_deployment


def test_groups_respect_the_budget_as_count_bytes_counts_it_and_keep_model_order():
    state = model_state(torch.bfloat16)
    budget = 900
    groups = plan_groups(specs_of(state), budget)
    assert any(len(group) > 1 for group in groups)  # several tensors per message where they fit
    for group in groups:
        record = to_record(pieces_of(state, group))
        assert record.count_bytes() <= budget
        bound = RECORD_OVERHEAD + sum(encoded_size(p.key, p.spec(TensorSpec.of(state[p.name]))) for p in group)
        assert bound - 40 * len(group) <= record.count_bytes() <= bound  # a bound, and a tight one
    assert [p.name for p in _dedupe(p for g in groups for p in g)] == list(state)


def _dedupe(pieces):
    seen, out = set(), []
    for piece in pieces:
        if piece.name not in seen:
            seen.add(piece.name)
            out.append(piece)
    return out


def test_a_tensor_over_budget_is_split_into_row_ranges_that_rebuild_it():
    # The 70B case in miniature: an embedding 4x the budget among small tensors.
    state = {
        "norm": torch.randn(16).bfloat16(),
        "emb": torch.randn(128, 16).bfloat16(),
        "head": torch.randn(4, 16).bfloat16(),
    }
    budget = 1100  # emb is 4096 bytes
    groups = plan_groups(specs_of(state), budget)
    emb = [p for g in groups for p in g if p.name == "emb"]
    assert len(emb) >= 4 and all(len(g) == 1 for g in groups if g[0].name == "emb")
    assert [p.rows for p in emb] == sorted(p.rows for p in emb) and emb[0].rows[0] == 0 and emb[-1].rows[1] == 128
    for group in groups:
        assert to_record(pieces_of(state, group)).count_bytes() <= budget
    received = {}
    for group in groups:
        received |= from_record(through_deployment(to_record(pieces_of(state, group))))
    rebuilt = torch.cat([received[p.key] for p in emb])
    assert torch.equal(bits(rebuilt), bits(state["emb"]))
    assert all(Piece.parse(p.key) == p for p in emb)


def test_an_unbounded_budget_is_one_group_and_a_single_huge_row_goes_alone():
    specs = specs_of(model_state(torch.float16))
    assert plan_groups(specs, math.inf) == [[Piece(name) for name in specs]]
    wide = {"row": TensorSpec((2, 1000), torch.bfloat16)}  # one row is 2000 bytes > budget
    assert plan_groups(wide, 500) == [[Piece("row", (0, 1))], [Piece("row", (1, 2))]]
