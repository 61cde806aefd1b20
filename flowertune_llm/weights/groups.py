"""Cutting a model into messages: groups of tensors, and row ranges of tensors, within a byte budget.

The plan is made once per run from the tensors' specs (weights/exchange.py): ``all_at_once`` is one group,
``layerwise`` groups of at most ``aggregation.max-message-mb``. Server and nodes name pieces by the same
keys (:class:`~flowertune_llm.weights.tensors.Piece`), so a node serves exactly what the server asks for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from flowertune_llm.weights.tensors import Piece, TensorSpec
from flowertune_llm.weights.transport import RECORD_OVERHEAD, encoded_size


def plan_groups(
    specs: Mapping[str, TensorSpec],
    max_bytes: float,
) -> list[list[Piece]]:
    """Cut a model into groups of pieces, in the mapping's order, each group's record at most ``max_bytes``.

    Sizes are bounded as ``ArrayRecord.count_bytes()`` will count them (:func:`encoded_size`,
    ``RECORD_OVERHEAD``), so ``to_record(group).count_bytes() <= max_bytes`` always holds. Consecutive
    tensors share a group while they fit; ``max_bytes=math.inf`` gives one group (the all-at-once exchange,
    same arithmetic).

    A tensor larger than the budget is split into row ranges of its first dimension. The
    budget is the memory knob: the server's peak is a multiple of the largest group, and the largest
    tensors (a 70B model's 2 GiB embedding and LM head against a 512 MB budget) would otherwise set it
    alone, 4x over. Splitting costs nothing in arithmetic (the mean is elementwise, so a row range averages
    to the same bits as the whole tensor) nor in copies (rows of a contiguous tensor are a view, also of an
    mmapped file), and :class:`Piece` keys (``name[start:stop]``) say where each range goes. A split tensor's
    ranges fill groups of their own. Only a tensor whose single row exceeds the budget (or a 0-d tensor)
    still goes alone over budget.
    """
    if not max_bytes > 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    groups: list[list[Piece]] = []
    current: list[Piece] = []
    current_bytes = RECORD_OVERHEAD

    def close() -> None:
        nonlocal current, current_bytes
        if current:
            groups.append(current)
        current, current_bytes = [], RECORD_OVERHEAD

    for name, spec in specs.items():
        size = encoded_size(name, spec)
        if current_bytes + size <= max_bytes:
            current.append(Piece(name))
            current_bytes += size
            continue
        close()
        if RECORD_OVERHEAD + size <= max_bytes or len(spec.shape) == 0 or spec.shape[0] <= 1:
            current, current_bytes = [Piece(name)], RECORD_OVERHEAD + size
            if current_bytes > max_bytes:
                close()
            continue
        for piece in _row_pieces(name, spec, max_bytes):
            groups.append([piece])
    close()
    return groups


def _row_pieces(name: str, spec: TensorSpec, max_bytes: float) -> Iterable[Piece]:
    """Equal row ranges of ``spec`` (the last one shorter), each as large as fits in ``max_bytes``."""
    rows = spec.shape[0]
    row_bytes = spec.nbytes // rows
    # The key and header entry grow a little with the range's digits; reserve for the widest range.
    widest = encoded_size(f"{name}[{rows}:{rows}]", TensorSpec((rows, *spec.shape[1:]), spec.dtype))
    overhead = RECORD_OVERHEAD + widest - spec.nbytes
    per_piece = max(1, int((max_bytes - overhead) // row_bytes)) if row_bytes else rows
    for start in range(0, rows, per_piece):
        yield Piece(name, (start, min(start + per_piece, rows)))


def group_specs(group: Sequence[Piece], specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """``{piece key: piece spec}``: what a record for this group must hold."""
    return {piece.key: piece.spec(specs[piece.name]) for piece in group}
