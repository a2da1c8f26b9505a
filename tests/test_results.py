"""The run summary printed after a run: ratios where a ratio means something, differences for quality."""
from fedcore_adapter.results import summary_table

ROWS = [{"node": "input", "params": 1000, "macs": 4000, "size_mb": 1.0, "latency_ms": 2.0, "throughput_sps": 500.0,
         "accuracy": 0.978, "loss": 0.100},
        {"node": "pruning", "params": 250, "macs": 1000, "size_mb": 0.25, "latency_ms": 1.0, "throughput_sps": 1000.0,
         "accuracy": 0.976, "loss": 0.112}]


def _cells(table: str) -> dict:
    header, _, *lines = table.splitlines()
    starts = [header.index(name) for name in header.split()]
    return {name: lines[-1][a:b].strip() for name, a, b in zip(header.split(), starts, starts[1:] + [None])}


def test_sizes_and_speeds_show_their_ratio_to_the_input_model():
    cells = _cells(summary_table(ROWS))
    assert (cells["params"], cells["macs"], cells["size_mb"]) == ("250 (0.25x)", "1000 (0.25x)", "0.25 (0.25x)")
    assert (cells["latency_ms"], cells["throughput_sps"]) == ("1 (0.50x)", "1000 (2.00x)")


def test_quality_shows_a_difference_never_a_ratio():
    cells = _cells(summary_table(ROWS))
    assert cells["accuracy"] == "0.976 (\N{MINUS SIGN}0.2 pt)"  # percentage points
    assert cells["loss"] == "0.112 (+0.012)"
    assert "x)" not in cells["accuracy"] + cells["loss"]


def test_the_input_row_and_unmeasured_values_show_no_change():
    rows = [ROWS[0], {**ROWS[1], "accuracy": None}]
    table = summary_table(rows)
    assert table.splitlines()[2].split() == ["input", "1000", "4000", "1", "2", "500", "0.978", "0.1"]
    assert _cells(table)["accuracy"] == "-"
