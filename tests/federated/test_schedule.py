import math

import pytest

from flowertune_llm.federated.schedule import cosine_annealing


def test_endpoints_are_max_and_min():
    assert cosine_annealing(1, 10, 5e-5, 1e-6) == pytest.approx(5e-5)
    assert cosine_annealing(10, 10, 5e-5, 1e-6) == pytest.approx(1e-6)


def test_midpoint_is_the_mean():
    assert cosine_annealing(3, 5, 1.0, 0.0) == pytest.approx(0.5)


def test_non_increasing_and_within_bounds():
    rates = [cosine_annealing(r, 100, 2e-4, 6e-6) for r in range(1, 101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert all(6e-6 <= r <= 2e-4 for r in rates)


def test_single_round_uses_max():
    assert cosine_annealing(1, 1, 1e-3, 1e-5) == 1e-3


def test_constant_when_max_equals_min():
    assert {cosine_annealing(r, 7, 1e-4, 1e-4) for r in range(1, 8)} == {1e-4}


@pytest.mark.parametrize("server_round", [0, 11])
def test_rounds_outside_the_run_are_refused(server_round):
    with pytest.raises(ValueError, match="outside"):
        cosine_annealing(server_round, 10, 1.0, 0.0)


def test_a_quarter_of_the_way_is_on_the_cosine_not_on_a_line():
    # Round 2 of 5 is a quarter of the way: 0.5 * (1 + cos(pi / 4)) = 0.854, where a linear decay gives 0.75.
    assert cosine_annealing(2, 5, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
