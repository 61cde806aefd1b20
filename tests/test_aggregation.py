import numpy as np
import pytest

from flowertune_llm.aggregation import WeightedMean, weighted_average, weighted_mean


def _state(a, b):
    return {"a": np.array(a, dtype=np.float32), "b": np.array(b, dtype=np.float32)}


def test_weighted_mean_matches_hand_computation():
    states = [_state([1.0, 2.0], [[0.0]]), _state([3.0, 6.0], [[3.0]]), _state([-1.0, 0.0], [[9.0]])]
    weights = [1, 2, 5]
    result = weighted_mean(states, weights)
    # (1*1 + 2*3 + 5*-1) / 8 = 0.25 ; (1*2 + 2*6 + 5*0) / 8 = 1.75 ; (0 + 6 + 45) / 8 = 6.375
    np.testing.assert_array_equal(result["a"], np.array([0.25, 1.75], dtype=np.float32))
    np.testing.assert_array_equal(result["b"], np.array([[6.375]], dtype=np.float32))


def test_equal_weights_give_the_plain_mean():
    states = [_state([2.0], [4.0]), _state([4.0], [8.0])]
    result = weighted_mean(states, [7, 7])
    assert result["a"][0] == 3.0 and result["b"][0] == 6.0


def test_result_keeps_each_tensor_dtype():
    reference = {"half": np.ones(3, np.float16), "full": np.ones(3, np.float32)}
    mean = WeightedMean(reference)
    mean.add(reference, 1.0)
    result = mean.result()
    assert result["half"].dtype == np.float16 and result["full"].dtype == np.float32


def test_folding_in_any_order_gives_the_same_mean():
    rng = np.random.default_rng(0)
    states = [{"w": rng.standard_normal((4, 3)).astype(np.float32)} for _ in range(4)]
    weights = [3, 1, 4, 1]
    forward = weighted_mean(states, weights)["w"]
    backward = weighted_mean(states[::-1], weights[::-1])["w"]
    np.testing.assert_allclose(forward, backward, rtol=1e-5, atol=1e-7)  # float32 sums round by order


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"a": np.zeros(2, np.float32)}, "tensor names differ"),
        ({**_state([1.0, 2.0], [0.0]), "c": np.zeros(1, np.float32)}, "tensor names differ"),
        (_state([1.0, 2.0, 3.0], [0.0]), "a is float32\\[3\\], expected float32\\[2\\]"),
        ({"a": np.zeros(2, np.float64), "b": np.zeros(1, np.float32)}, "a is float64"),
        (_state([1.0, np.nan], [0.0]), "NaN or Inf"),
        (_state([1.0, 2.0], [np.inf]), "NaN or Inf"),
    ],
)
def test_mismatched_updates_are_refused_with_a_reason(bad, reason):
    mean = WeightedMean(_state([0.0, 0.0], [0.0]))
    assert mean.mismatch(bad) is not None
    with pytest.raises(ValueError, match=reason):
        mean.add(bad, 1.0)
    assert mean.count == 0


def test_non_positive_weight_is_refused():
    mean = WeightedMean(_state([0.0, 0.0], [0.0]))
    with pytest.raises(ValueError, match="positive"):
        mean.add(_state([1.0, 1.0], [1.0]), 0)


def test_empty_mean_is_an_error():
    with pytest.raises(ValueError, match="no state"):
        WeightedMean(_state([0.0], [0.0])).result()


def test_weighted_average_of_losses():
    assert weighted_average([2.0, 4.0], [1, 3]) == pytest.approx(3.5)
