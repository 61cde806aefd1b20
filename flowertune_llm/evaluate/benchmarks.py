"""The leaderboard's datasets, per challenge: where each comes from, which rows it takes, and its examples.

Each :class:`Benchmark` turns the source rows (a Hub split, or a local copy with the same columns; see
sources.py) into :class:`Example` s: the exact prompt the leaderboard's code builds and the gold answer
as its data holds it. Selections follow the leaderboard's code (Flower ``fdef7afb``):

* FPB: ``takala/financial_phrasebank`` ``sentences_50agree`` train, then ``train_test_split(0.25, seed=42)``'s
  test part, in the permutation's order (1,212 rows); FiQA: ``pauri32/fiqa-2018`` train + validation + test
  concatenated in that order, the same split (304 rows); TFNS: the validation split as it is (2,388).
* MMLU: the leaderboard read ``lukaemon/mmlu``, a loading script ``datasets`` 4 no longer runs; the same
  Hendrycks data is ``cais/mmlu`` (parquet). The script parsed each subject's CSV with pandas and stored
  every cell with ``str()``, so an option such as "None" became "nan" and an all-numeric column "2.0":
  :func:`_as_the_script_read_it` does the same (quirk kept).
* Medical: PubMedQA fold 0 test (500), MedMCQA validation (4,183), MedQA 4 options test (1,273), CareQA_en
  test (5,621). MedQA's gold is the key of the first option whose text equals ``answer``; its options are
  shown lettered by position (quirk kept).
* Code: HumanEval (164), MBPP full test (500), MultiPL-E humaneval-js/-cpp v3.1 (161 each). Prompts of
  HumanEval and MultiPL-E are ``strip()``-ed, MBPP's are not; stop words are the harness's, MultiPL-E's
  come from the dataset's first row.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowertune_llm.evaluate import prompts

Row = dict[str, Any]


@dataclass(frozen=True)
class Example:
    """One prompt and its gold answer, as the leaderboard's data holds it (before normalisation)."""

    dataset: str
    prompt: str
    target: str  # a letter, yes/no/maybe, a sentiment, or (code) the test program appended to the output
    stop: tuple[str, ...] = ()  # code: where a completion ends


@dataclass(frozen=True)
class Hub:
    """Where a source lives on the Hugging Face Hub (the revision of a parquet export where the original is a script)."""

    path: str
    splits: tuple[str, ...]  # concatenated in this order
    name: str | None = None
    data_dir: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class Source:
    """The rows a benchmark reads: a Hub split, or ``<data-dir>/<name>.{jsonl,json,parquet,csv}``."""

    name: str
    hub: Hub
    columns: tuple[str, ...]  # what the rows must hold


@dataclass(frozen=True)
class Benchmark:
    name: str  # the short name: --datasets, predictions, results
    title: str  # the leaderboard's column heading
    source: Source
    rows: int  # what the leaderboard's selection gives on the full data
    answer: str  # mcq | boolean | sentiment | python | js | cpp
    build: Callable[[str, Sequence[Row]], list[Example]] = field(repr=False)
    max_length: int | None = None  # code: prompt + completion tokens (the harness's max_length_generation)

    @property
    def metric(self) -> str:
        return "pass@1" if self.answer in ("python", "js", "cpp") else "accuracy"


# --- general NLP -------------------------------------------------------------------------------------------

_MMLU = Source("mmlu", Hub("cais/mmlu", ("test",), name="all"), ("question", "subject", "choices", "answer"))


def _as_the_script_read_it(rows: Sequence[Row]) -> list[list[str]]:
    """One subject's rows as ``lukaemon/mmlu`` held them: CSV -> ``pd.read_csv(header=None)`` -> ``str(cell)``."""
    import pandas as pd

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow([row["question"], *row["choices"], "ABCD"[int(row["answer"])]])
    buffer.seek(0)
    frame = pd.read_csv(buffer, header=None, keep_default_na=True)
    return [[str(cell) for cell in record] for record in frame.itertuples(index=False)]


def _mmlu(category: str) -> Callable[[str, Sequence[Row]], list[Example]]:
    def build(dataset: str, rows: Sequence[Row]) -> list[Example]:
        by_subject: dict[str, list[Row]] = {}
        for row in rows:
            by_subject.setdefault(row["subject"], []).append(row)
        examples = []
        for subject in prompts.MMLU_CATEGORIES[category]:
            if subject not in by_subject:
                continue
            for question, *choices, gold in _as_the_script_read_it(by_subject[subject]):
                body = prompts.question_with_options(question, choices)
                examples.append(Example(dataset, prompts.answer_prompt(prompts.MMLU_INSTRUCTION, body), gold))
        return examples

    return build


# --- finance -----------------------------------------------------------------------------------------------

_FPB = Source("fpb", Hub("takala/financial_phrasebank", ("train",), data_dir="sentences_50agree",
                         revision="refs/convert/parquet"), ("sentence", "label"))  # fmt: skip
_FIQA = Source("fiqa", Hub("pauri32/fiqa-2018", ("train", "validation", "test")), ("sentence", "sentiment_score", "format"))
_TFNS = Source("tfns", Hub("zeroshot/twitter-financial-news-sentiment", ("validation",)), ("text", "label"))


def _quarter(rows: Sequence[Row]) -> list[Row]:
    """``train_test_split(0.25, seed=42)["test"]``, through ``datasets`` itself so the permutation is the same."""
    from datasets import Dataset

    if len(rows) < 2:
        return list(rows)
    return Dataset.from_list(list(rows)).train_test_split(0.25, seed=42)["test"].to_list()


def _fpb(dataset: str, rows: Sequence[Row]) -> list[Example]:
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    instruction = prompts.sentiment_instruction("news")
    return [Example(dataset, prompts.sentiment_prompt(instruction, r["sentence"]), labels[int(r["label"])]) for r in _quarter(rows)]


def _fiqa(dataset: str, rows: Sequence[Row]) -> list[Example]:
    def label(score: float) -> str:  # -0.1 is neutral, 0.1 positive (finance/utils.py:generate_label)
        return "negative" if score < -0.1 else "neutral" if score < 0.1 else "positive"

    return [
        Example(dataset, prompts.sentiment_prompt(prompts.sentiment_instruction("tweet" if r["format"] == "post" else "news"),
                                                  r["sentence"]), label(float(r["sentiment_score"])))  # fmt: skip
        for r in _quarter(rows)
    ]


def _tfns(dataset: str, rows: Sequence[Row]) -> list[Example]:
    labels = {0: "negative", 1: "positive", 2: "neutral"}  # Bearish, Bullish, Neutral
    instruction = prompts.sentiment_instruction("tweet")
    return [Example(dataset, prompts.sentiment_prompt(instruction, r["text"]), labels[int(r["label"])]) for r in rows]


# --- medical -----------------------------------------------------------------------------------------------

_PUBMEDQA = Source("pubmedqa", Hub("bigbio/pubmed_qa", ("test",), data_dir="pubmed_qa_labeled_fold0_source",
                                   revision="refs/convert/parquet"), ("QUESTION", "CONTEXTS", "final_decision"))  # fmt: skip
_MEDQA = Source("medqa", Hub("bigbio/med_qa", ("test",), data_dir="med_qa_en_4options_source", revision="refs/convert/parquet"),
                ("question", "answer", "options"))  # fmt: skip
_MEDMCQA = Source("medmcqa", Hub("openlifescienceai/medmcqa", ("validation",)), ("question", "opa", "opb", "opc", "opd", "cop"))
_CAREQA = Source("careqa", Hub("HPAI-BSC/CareQA", ("test",), name="CareQA_en"), ("question", "op1", "op2", "op3", "op4", "cop"))


def _pubmedqa(dataset: str, rows: Sequence[Row]) -> list[Example]:
    instruction = prompts.MEDICAL_INSTRUCTIONS["pubmedqa"]
    return [
        Example(dataset, prompts.answer_prompt(instruction, "\n".join(r["CONTEXTS"]) + "\n" + r["QUESTION"]), r["final_decision"])
        for r in rows
    ]


def _lettered(dataset: str, rows: Sequence[Row], question: Callable[[Row], tuple[str, list[str], str]]) -> list[Example]:
    instruction = prompts.MEDICAL_INSTRUCTIONS[dataset]
    examples = []
    for row in rows:
        text, choices, gold = question(row)
        examples.append(Example(dataset, prompts.answer_prompt(instruction, prompts.question_with_options(text, choices)), gold))
    return examples


def _medqa_row(row: Row) -> tuple[str, list[str], str]:
    gold = next((option["key"] for option in row["options"] if option["value"] == row["answer"]), None)
    if gold is None:
        raise ValueError(f"medqa: no option of {row['question'][:60]!r} has the answer's text {row['answer']!r}")
    return row["question"], [option["value"] for option in row["options"]], gold


def _medmcqa_row(row: Row) -> tuple[str, list[str], str]:
    return row["question"], [row["opa"], row["opb"], row["opc"], row["opd"]], "ABCD"[int(row["cop"])]


def _careqa_row(row: Row) -> tuple[str, list[str], str]:
    return row["question"], [row["op1"], row["op2"], row["op3"], row["op4"]], "ABCD"[int(row["cop"]) - 1]


# --- code --------------------------------------------------------------------------------------------------

_HUMANEVAL = Source("humaneval", Hub("openai/openai_humaneval", ("test",)), ("prompt", "test", "entry_point"))
_MBPP = Source("mbpp", Hub("google-research-datasets/mbpp", ("test",), name="full"), ("text", "test_list"))
MULTIPLE_REVISION = "ff5c146da05f10bc69b9ce393b77f381b3825d1b"  # MultiPL-E 3.1, the harness's pin
_MULTIPLE = {
    language: Source(f"multiple-{language}", Hub("nuprl/MultiPL-E", ("test",), name=f"humaneval-{language}",
                                                 revision=MULTIPLE_REVISION), ("name", "prompt", "tests", "stop_tokens"))
    for language in ("js", "cpp")
}  # fmt: skip

HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
MBPP_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")


def _humaneval(dataset: str, rows: Sequence[Row]) -> list[Example]:
    return [Example(dataset, r["prompt"].strip(), f"\n{r['test']}\ncheck({r['entry_point']})", HUMANEVAL_STOP) for r in rows]


def _mbpp(dataset: str, rows: Sequence[Row]) -> list[Example]:
    return [Example(dataset, prompts.mbpp_prompt(r["text"], r["test_list"][0]), "\n".join(r["test_list"]), MBPP_STOP) for r in rows]


def _multiple(dataset: str, rows: Sequence[Row]) -> list[Example]:
    stop = (*rows[0]["stop_tokens"], "<file_sep>") if rows else ()  # the first row's, for every problem
    return [Example(dataset, r["prompt"].strip(), r["tests"], tuple(stop)) for r in rows]


# --- the challenges ----------------------------------------------------------------------------------------

_MMLU_ROWS = {"stem": 3153, "social_sciences": 3077, "humanities": 4705, "other": 3107}
_MMLU_TITLES = {"stem": "STEM", "social_sciences": "SS", "humanities": "Humanities", "other": "Other"}

CHALLENGES: dict[str, list[Benchmark]] = {
    "general-nlp": [Benchmark(c, _MMLU_TITLES[c], _MMLU, _MMLU_ROWS[c], "mcq", _mmlu(c)) for c in _MMLU_ROWS],
    "finance": [
        Benchmark("fpb", "FPB", _FPB, 1212, "sentiment", _fpb),
        Benchmark("fiqa", "FIQA", _FIQA, 304, "sentiment", _fiqa),
        Benchmark("tfns", "TFNS", _TFNS, 2388, "sentiment", _tfns),
    ],
    "medical": [
        Benchmark("pubmedqa", "PubMedQA", _PUBMEDQA, 500, "boolean", _pubmedqa),
        Benchmark("medmcqa", "MedMCQA", _MEDMCQA, 4183, "mcq", lambda d, rows: _lettered(d, rows, _medmcqa_row)),
        Benchmark("medqa", "MedQA", _MEDQA, 1273, "mcq", lambda d, rows: _lettered(d, rows, _medqa_row)),
        Benchmark("careqa", "CareQA", _CAREQA, 5621, "mcq", lambda d, rows: _lettered(d, rows, _careqa_row)),
    ],
    "code": [
        Benchmark("mbpp", "MBPP", _MBPP, 500, "python", _mbpp, max_length=2048),
        Benchmark("humaneval", "HumanEval", _HUMANEVAL, 164, "python", _humaneval, max_length=1024),
        Benchmark("multiple-js", "MultiPL-E (JS)", _MULTIPLE["js"], 161, "js", _multiple, max_length=1024),
        Benchmark("multiple-cpp", "MultiPL-E (C++)", _MULTIPLE["cpp"], 161, "cpp", _multiple, max_length=1024),
    ],
}
# What the leaderboard averages (general NLP's "other" category is defined but not reported).
LEADERBOARD = {challenge: [b.name for b in benchmarks if b.name != "other"] for challenge, benchmarks in CHALLENGES.items()}


def select(challenge: str, names: str | None) -> list[Benchmark]:
    """The benchmarks of ``challenge`` named in ``names`` (comma-separated; None: the leaderboard's set)."""
    if challenge not in CHALLENGES:
        raise ValueError(f"--challenge {challenge!r}: allowed: {', '.join(CHALLENGES)}")
    known = {b.name: b for b in CHALLENGES[challenge]}
    wanted = [n.strip() for n in names.split(",")] if names else LEADERBOARD[challenge]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"--datasets {names!r}: {challenge} has {', '.join(known)}")
    return [known[n] for n in dict.fromkeys(wanted)]


def by_name(challenge: str) -> dict[str, Benchmark]:
    return {b.name: b for b in CHALLENGES[challenge]}


def leaderboard_average(percentages: Sequence[float]) -> float | None:
    """The leaderboard's average: of the scores each already rounded to 2 decimals, then rounded
    (code's published 31.60, 23.78, 28.57, 25.47 average to 27.36, where the unrounded mean gives 27.35)."""
    if not percentages:
        return None
    return round(math.fsum(round(p, 2) for p in percentages) / len(percentages), 2)
