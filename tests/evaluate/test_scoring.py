"""The leaderboard's answer extraction, rule by rule, including the quirks that decide published scores."""

import pytest

from flowertune_llm.evaluate.scoring import accuracy, correct, extract_answer, sentiment


@pytest.mark.parametrize(
    "output, prediction",
    [
        ("A", "a"), (" A", "a"), ("A.", "a"), ("(B)", "b"),
        ("Answer", "a"), ("answer: c", "a"), ("Both", "b"), ("Calcium", "c"), ("Doctor", "d"), ("Explanation", "e"),
        ("### B", "b"), ("foo\n## B", "b"), ("foo\n### answer: b", "a"),  # after "\n##" the "#" left is a space
        ("The", "the"), ("the answer is B", "the answer is b"), ("", ""), ("\n\n", "\n\n"), ("1", "1"), ("é", "é"),
    ],
)  # fmt: skip
def test_multiple_choice_takes_the_first_alphanumeric_character_when_it_is_a_letter_a_to_e(output, prediction):
    assert extract_answer(output, "A", "mcq") == (prediction, "a")


@pytest.mark.parametrize(
    "output, prediction",
    [
        ("yes", "yes"), ("Yes.", "yes"), ("no!", "no"), ("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"),
        ("noyes", "no"), ("yes no", "yes no"), ("maybe", "maybe"), ("Maybe", "maybe"), (" maybe", " maybe"),
        ("maybe.", "maybe."), ("I think yes", "i think yes"),
    ],
)  # fmt: skip
def test_yes_no_maybe_needs_the_exact_word_and_maybe_the_exact_raw_output(output, prediction):
    assert extract_answer(output, "maybe", "boolean")[0] == prediction
    assert correct(output, "maybe", "boolean") == (prediction == "maybe")


@pytest.mark.parametrize(
    "text, label",
    [
        ("positive", "positive"), ("Positive outlook", "positive"), ("negative, not positive", "positive"),
        ("Negative", "negative"), ("neutral", "neutral"), ("POSITIVE", "neutral"), ("bullish", "neutral"),
        ("None", "neutral"), ("", "neutral"),
    ],
)  # fmt: skip
def test_finance_positive_wins_over_negative_and_anything_else_is_neutral(text, label):
    assert sentiment(text) == label


def test_accuracy_is_the_share_of_right_answers():
    outputs = ["B", "Calcium", "the answer is A", "D"]
    assert accuracy(outputs, ["B", "C", "A", "A"], "mcq") == 0.5
    assert accuracy(["positive", "None", "negative"], ["positive", "neutral", "positive"], "sentiment") == pytest.approx(2 / 3)
    assert accuracy([], [], "mcq") == 0.0
