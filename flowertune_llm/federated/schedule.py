"""The learning rate of each round: the one place it is decided."""

import math


def cosine_annealing(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """Cosine decay across rounds, ``lr_max`` in round 1 and ``lr_min`` in the last round.

    The client holds this rate constant for all its local steps in the round, so the schedule is a
    property of the federation, not of any one client's optimizer.
    """
    if not 1 <= server_round <= num_rounds:
        raise ValueError(f"server_round {server_round} is outside 1..{num_rounds}")
    if num_rounds == 1:
        return lr_max
    progress = (server_round - 1) / (num_rounds - 1)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * progress))
