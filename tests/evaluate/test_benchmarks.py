"""Rows in the datasets' own columns become the leaderboard's examples: its selections, labels and golds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from flowertune_llm.evaluate import benchmarks
from flowertune_llm.evaluate.benchmarks import by_name, leaderboard_average, select

DATA = Path(__file__).with_name("data")


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


def build(challenge: str, name: str, source: str | None = None):
    benchmark = by_name(challenge)[name]
    return benchmark.build(name, rows(source or benchmark.source.name))


def test_fpb_and_fiqa_take_the_quarter_that_datasets_split_with_seed_42():
    expected = Dataset.from_list(rows("fpb")).train_test_split(0.25, seed=42)["test"]
    examples = build("finance", "fpb")
    assert [e.prompt.split("Input: ")[1].removesuffix("\nAnswer: ") for e in examples] == expected["sentence"]
    assert [e.target for e in examples] == [{0: "negative", 1: "neutral", 2: "positive"}[x] for x in expected["label"]]
    assert len(examples) == 2 and len(build("finance", "fiqa")) == 2  # ceil(8 / 4)


def test_fiqa_labels_by_score_with_the_boundaries_on_the_upper_side_and_tweets_for_posts():
    one_each = {r["sentence"]: benchmarks._fiqa("fiqa", [r])[0] for r in rows("fiqa")}  # one row: no split
    assert {text: e.target for text, e in one_each.items()} == {
        "$XYZ breaking out, loading more here": "positive", "Bank shares slide after profit warning": "negative",
        "$ABC flat into the close": "neutral", "Retailer to open 20 new stores": "positive",  # 0.1 is positive
        "Miner cuts output forecast": "neutral", "$QRS looks weak, stop hit": "negative",  # -0.1 is neutral
        "Airline traffic steady in June": "neutral", "$TUV new highs on volume": "positive",
    }  # fmt: skip
    assert all(("this tweet?" in e.prompt) == text.startswith("$") for text, e in one_each.items())  # posts


def test_tfns_maps_bearish_bullish_neutral_and_keeps_every_row():
    examples = build("finance", "tfns")
    assert [e.target for e in examples] == ["negative", "positive", "neutral", "negative", "positive"]


def test_medical_golds_come_from_the_answer_text_and_shifted_indices():
    assert [e.target for e in build("medical", "medqa")] == ["B", "D"]  # the key whose text is the answer
    assert [e.target for e in build("medical", "medmcqa")] == ["B", "C"]  # cop 0-3
    assert [e.target for e in build("medical", "careqa")] == ["B", "A"]  # cop 1-4
    pubmedqa = build("medical", "pubmedqa")
    assert [e.target for e in pubmedqa] == ["yes", "no", "maybe"]
    assert "Adults walked 30 minutes a day for a year.\nResting heart rate fell by 4 beats.\nDoes daily walking" in pubmedqa[0].prompt
    assert "Question:" not in pubmedqa[0].prompt  # PubMedQA has no format_example
    with pytest.raises(ValueError, match="no option of .* has the answer's text 'Vitamin K'"):
        benchmarks._medqa_row({**rows("medqa")[1], "answer": "Vitamin K"})


def test_mmlu_orders_by_the_category_list_and_reads_cells_as_the_loading_script_did():
    stem = build("general-nlp", "stem", "mmlu")
    # college_mathematics, college_physics come before ... and astronomy first: the category's list order.
    assert [e.target for e in stem] == ["B", "C", "B", "A"]
    assert stem[0].prompt.count("Which option lists a planet.") == 1  # astronomy is 3rd in STEM, first here
    physics = next(e for e in stem if "ideal gas" in e.prompt)
    assert "D. nan\n" in physics.prompt  # the option "None" went through pandas as NaN, then str()
    assert "heated at constant volume. Its pressure?" in physics.prompt
    assert build("general-nlp", "social_sciences", "mmlu")[0].target == "A"
    other = build("general-nlp", "other", "mmlu")[0]
    assert "A. yes\nB. no\nC. nan\nD. maybe" in other.prompt  # "NA" is one of pandas' missing-value strings


def test_mmlu_numeric_option_columns_come_out_as_pandas_typed_them():
    mixed = [{"question": "q1", "subject": "anatomy", "choices": ["2", "1", "0.5", "x"], "answer": 0},
             {"question": "q2", "subject": "anatomy", "choices": ["3", "2", "1", "y"], "answer": 1}]  # fmt: skip
    prompts = [e.prompt for e in by_name("general-nlp")["stem"].build("stem", mixed)]
    assert "A. 2\nB. 1\nC. 0.5\nD. x" in prompts[0] and "A. 3\nB. 2\nC. 1.0\nD. y" in prompts[1]  # float column


def test_code_prompts_are_stripped_except_mbpps_and_multiple_takes_its_stop_words_from_the_first_row():
    humaneval = build("code", "humaneval")[0]
    assert humaneval.prompt.endswith('    """') and humaneval.target == "\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)"
    assert build("code", "mbpp")[0].prompt.endswith('"""\n') and build("code", "mbpp")[0].target == "assert square(3) == 9\nassert square(-2) == 4"
    js = build("code", "multiple-js")[0]
    assert js.stop == ("\nfunction ", "\n/*", "\n//", "\nconsole.log", "<file_sep>") and js.prompt.endswith("{")


def test_the_leaderboard_average_rounds_each_score_first():
    assert leaderboard_average([31.60, 23.78, 28.57, 25.47]) == 27.36  # the code baseline; unrounded: 27.35
    assert leaderboard_average([100 * 540 / 1212, 100 * 190 / 304, 100 * 687 / 2388]) == 45.27  # finance baseline
    assert leaderboard_average([]) is None


def test_choosing_datasets_names_what_exists():
    assert [b.name for b in select("general-nlp", None)] == ["stem", "social_sciences", "humanities"]
    assert [b.name for b in select("medical", "careqa, pubmedqa")] == ["careqa", "pubmedqa"]
    with pytest.raises(ValueError, match="--datasets 'fpb,mmlu': finance has fpb, fiqa, tfns"):
        select("finance", "fpb,mmlu")
    with pytest.raises(ValueError, match="--challenge 'legal': allowed: general-nlp, finance, medical, code"):
        select("legal", None)
