"""``fedcore-adapter search`` and ``train need_evo_opt=true`` from the command line: results, and bad input as one
line with exit status 2, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.search.helpers import DATA, MODEL, SETUP

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, command, *extra):
    setup_file = tmp_path / "tiny.yaml"
    setup_file.write_text(yaml.safe_dump(SETUP))
    args = [sys.executable, "-m", "fedcore_adapter", command, f"setup={setup_file}", "model=custom",
            f"model._target_={MODEL['_target_']}", "data=custom", f"data._target_={DATA['_target_']}",
            "tracking=none", f"output_dir={tmp_path / 'out'}", "model_name=tiny", "search.moves.insert=[]", *extra]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("override, message", [
    ("search.objectives=[macs,flops]", "objective 'flops' is not a metric; allowed: macs, params"),
    ("search.trials=0", "trials must be a positive number of trials (got 0)"),
    ("search.quality=loss", "search.quality = 'loss': 'loss' is not a quality where higher is better; allowed: "
                            "accuracy, or a quality column the model's validation step logs"),
    ("search.quality=throughput_sps", "search.quality = 'throughput_sps': 'throughput_sps' is not a quality"),
    ("search.objectives=[macs,recall_top_k]", "objective 'recall_top_k' is not a metric; allowed: macs, params, "
                                              "size_mb, latency_ms, latency_ms_per_sample, throughput_sps, "
                                              "accuracy, loss; a quality column the model logs (recall_top_k, "
                                              "...) after search.quality=<it>"),
    ("search.reuse_after=0", "search.reuse_after = 0: Input should be greater than or equal to 1"),
    ("search.reuse_per_prefix=0", "search.reuse_per_prefix = 0: Input should be greater than or equal to 1"),
    ("search.early_stop.within_nodes=sometimes", "search.early_stop.within_nodes = 'sometimes': Input should be "
                                                 "'off', 'final_phase', 'phase_ends' or 'all'"),
    ("search.reuse_parent=best", "search.reuse_parent = 'best': Input should be 'uniform' or 'contribution'"),
    ("search.reuse_redraw=all", "search.reuse_redraw = 'all': Input should be 'last' or 'structural'"),
    ("search.reuse_recover=1.5", "search.reuse_recover = 1.5: Input should be less than or equal to 1"),
    ("search.recover_within=-0.01", "search.recover_within = -0.01: Input should be greater than or equal to 0"),
    ("search.training_cache_mb=0", "search.training_cache_mb = 0: Input should be greater than 0"),
    ("search.early_stop.margin=-1", "search.early_stop.margin = -1: margin must be auto or an accuracy >= 0"),
    ("search.early_stop.recovered_by=[distilation]", "search.early_stop.recovered_by = ['distilation']: "
                                                     "'distilation': not a node kind; kinds: deploy, distillation"),
    ("search.space.pruning=false", "search space is empty: setup TINY (training -> pruning)"),
    ("search.space.pruning.pruning_ratio.low=2",
     "search.space.pruning.pruning_ratio: a numeric range needs low < high"),
])
def test_bad_search_input_is_one_line_and_exit_status_2_with_nothing_written(tmp_path, override, message):
    proc = _run(tmp_path, "search", override, "search.moves.drop=false", "search.moves.reorder=false")
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert proc.stderr.strip().startswith("error: ") and "\n" not in proc.stderr.strip()
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_constraint_no_trial_meets_ends_in_a_line_naming_the_closest_trial_and_exit_status_1(tmp_path):
    proc = _run(tmp_path, "search", "search.trials=1", "search.max_accuracy_drop=0",
                "search.space.pruning.pruning_ratio.low=0.9", "search.space.pruning.pruning_ratio.high=0.95",
                "nodes.1.finetune_params.epochs=0", "search.moves.drop=false")
    assert proc.returncode == 1, proc.stderr[-1500:]
    assert "no trial met the constraint" in proc.stdout and "closest: trial #0" in proc.stdout
    assert "trial 1/1 #0 pruning#1:" in proc.stdout and "ETA" in proc.stdout


def test_train_with_need_evo_opt_runs_the_search_from_the_setups_chain(tmp_path):
    proc = _run(tmp_path, "train", "need_evo_opt=true", "search.trials=2", "search.objectives=[params,accuracy]",
                "search.max_accuracy_drop=0.5")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "trial 1/2" in proc.stdout and "trial 2/2" in proc.stdout, proc.stdout[-1500:]
    folder = tmp_path / "out" / "SEARCH_TINY_tiny"
    assert (folder / "trials.csv").exists() and (folder / "pareto.png").exists()
    assert list((folder / "pareto").glob("trial_*.yaml"))
