"""The live line per finished trial writes its figures readably at every scale."""
from __future__ import annotations

from fedcore_adapter.search.driver import _describe


def test_latency_above_ten_ms_keeps_its_decimals_and_macs_get_thousands_separators():
    row = {"macs": 43016, "macs_reduction": 20.17, "latency_ms": 12.3456, "throughput_sps": 187559.7,
           "val_accuracy": 0.9375, "accuracy": 0.947}
    text = _describe(row, ["macs", "latency_ms", "throughput_sps", "accuracy"])
    assert "macs 43,016 (20.2x fewer)" in text
    assert "latency_ms 12.35" in text
    assert "throughput_sps 187,560" in text
    assert "val accuracy 0.9375" in text and "test accuracy 0.9470" in text


def test_small_and_hundreds_values_show_four_significant_digits():
    text = _describe({"latency_ms": 3.14159, "size_mb": 123.456}, ["latency_ms", "size_mb"])
    assert "latency_ms 3.1416" in text and "size_mb 123.5" in text
