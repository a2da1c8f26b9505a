"""How ``run_many`` orders a sweep's runs: the longest first, by their setups' epochs."""
from fedcore_adapter.distributed.runs import estimated_work, longest_first


def test_estimated_work_counts_every_nodes_epochs_with_pruning_iterations_and_fine_tunes():
    # COMPOSITE_1: training 10 | pruning 5 iterations x 5 epochs + 10 | low_rank 20 + 10 | the same pruning
    assert estimated_work({"setup": "composite_1"}) == (1 + 10) + 2 * (1 + 5 * 5 + 10) + (1 + 20 + 10)
    assert estimated_work({"setup": "RAW"}) == 1 + 100
    assert estimated_work({}) == estimated_work({"setup": "RAW"})


def test_estimated_work_follows_the_runs_own_overrides():
    assert estimated_work({"setup": "RAW", "nodes": {"training": {"epochs": 3}}}) == 4
    assert estimated_work({"setup": "RAW", "nodes": {"0": {"epochs": 7}}}) == 8


def test_a_setup_that_cannot_be_read_counts_as_no_work_and_the_run_reports_its_own_error():
    assert estimated_work({"setup": "NO_SUCH_SETUP"}) == 0.0
    assert estimated_work({"setup": "RAW", "nodes": {"quantization": {"epochs": 1}}}) == 0.0


def test_longest_first_keeps_ties_in_their_order():
    assert longest_first([4, 15, 13, 15, 0]) == [1, 3, 2, 0, 4]
    assert longest_first([]) == []
