"""Prometheus histograms: cumulative bucket counts, edges inclusive (`le`), +Inf counting everything."""

from __future__ import annotations

from fastprompt.serve.metrics import Histogram


def test_histogram_renders_cumulative_inclusive_buckets():
    histogram = Histogram("h", "help", buckets=(0.1, 0.5, 2.0))
    values = [0.05, 0.1, 0.3, 0.5, 0.7, 1.9, 2.0, 3.0, 40.0]
    for value in values:
        histogram.observe(value)
    lines = histogram.render()
    assert lines[2:] == ['h_bucket{le="0.1"} 2', 'h_bucket{le="0.5"} 4', 'h_bucket{le="2.0"} 7',
                         'h_bucket{le="+Inf"} 9', f"h_sum {sum(values):.6f}", "h_count 9"]
