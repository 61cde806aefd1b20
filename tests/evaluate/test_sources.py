"""Local copies of the datasets: each file found, read and checked for its columns, or named in one line."""

from __future__ import annotations

import json

import pytest

from flowertune_llm.evaluate.benchmarks import by_name
from flowertune_llm.evaluate.sources import SourceError, check_count, load_rows

FPB = by_name("finance")["fpb"].source


def test_every_format_reads_the_same_rows(tmp_path):
    rows = [{"sentence": "Sales rose .", "label": 2}, {"sentence": "Sales fell .", "label": 0}]
    for suffix in (".jsonl", ".json", ".parquet", ".csv"):
        directory = tmp_path / suffix.strip(".")
        directory.mkdir()
        if suffix == ".jsonl":
            (directory / "fpb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif suffix == ".json":
            (directory / "fpb.json").write_text(json.dumps(rows))
        else:
            from datasets import Dataset

            (Dataset.to_parquet if suffix == ".parquet" else Dataset.to_csv)(Dataset.from_list(rows), directory / f"fpb{suffix}")
        assert load_rows([FPB], directory)["fpb"] == rows, suffix


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "no fpb.jsonl (or .json, .parquet, .csv)"),
        ({"fpb.jsonl": '{"sentence": "x"}\n'}, "fpb.jsonl: lacks column(s) label (has: sentence); fpb needs sentence, label"),
        ({"fpb.jsonl": '{"sentence": "x", "label": 1}\n{oops\n'}, "fpb.jsonl: line 2 is not JSON"),
        ({"fpb.json": '{"sentence": "x"}'}, "fpb.json: expected one object per row"),
        ({"fpb.jsonl": "\n"}, "fpb.jsonl: no rows"),
        ({"fpb.jsonl": "{}\n", "fpb.csv": "a\n"}, "fpb is there twice: fpb.jsonl, fpb.csv"),
    ],
)
def test_a_file_that_cannot_serve_names_itself(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SourceError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_rows([FPB], tmp_path)


def test_a_row_count_unlike_the_leaderboards_is_a_warning_unless_limited():
    fpb = by_name("finance")["fpb"]
    assert check_count(fpb, 1212, limited=False) is None and check_count(fpb, 10, limited=True) is None
    assert check_count(fpb, 1211, limited=False) == "fpb: 1211 rows, the leaderboard's selection has 1212: scores are not comparable"
