"""bench/data_order.py: one line per (rows, order), each with both timings."""

import json

from bench import data_order


def test_data_order_times_both_ways_for_each_order(capsys):
    data_order.main(["--rows", "40", "--steps", "3", "--repeats", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["rows"], line["order"]) for line in lines] == [(40, "shuffled"), (40, "stratified")]
    assert all(line["every_step_us"] > 0 and line["once_per_epoch_us"] > 0 for line in lines)
