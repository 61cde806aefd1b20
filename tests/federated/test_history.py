"""The round record: what history.json keeps, the line the log shows, the budget warned about once."""

from __future__ import annotations

import logging

from flowertune_llm.federated.history import COMMUNICATION_BUDGET_MB, History, RoundRecord

MIB = 2**20


def test_the_round_line_names_loss_rate_nodes_groups_and_mib(caplog):
    caplog.set_level(logging.INFO)
    history = History([RoundRecord(1, 3e-3, 6.9527, ["partition-0", "partition-1"], ["partition-0", "partition-1"],
                                   groups=1, bytes_down=269_000, bytes_up=269_000, seconds=10.94)])  # fmt: skip
    history.report(history[0], 8)
    assert ("[round 1/8] train_loss 6.9527 | lr 0.003 | 2/2 nodes | 1 group(s) | down 0.26 MiB, up 0.26 MiB, "
            "total 0.51 MiB | 10.9 s") in caplog.text


def test_the_budget_is_warned_about_once_when_crossed(caplog):
    history = History()
    for number, size in enumerate((COMMUNICATION_BUDGET_MB * 0.6, COMMUNICATION_BUDGET_MB * 0.6, 1), start=1):
        history.append(RoundRecord(number, 1e-4, bytes_down=int(size * MIB)))
        history.report(history[-1], 3)
    assert caplog.text.count("exceeds the FlowerTune leaderboard budget") == 1


def test_a_record_reads_back_from_json_and_ignores_what_it_does_not_know():
    record = RoundRecord(2, 1e-4, 5.5, ["node-3"], [], {"node-3": "left out"}, eval_loss=5.9)
    again = RoundRecord.from_json({**History([record]).as_json()[0], "from_a_later_version": 1})
    assert again == record
