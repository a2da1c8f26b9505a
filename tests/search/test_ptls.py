"""The search on real pytorch-lifestream models and PtlsDataModules: a ``SequenceToTarget`` searched through the
seed's entry point (``fedcore_fit(..., need_evo_opt=True)``), its best setup run again with the same metrics; a
``CoLESModule``, which reports no accuracy, constrained on the ``recall_top_k`` its validation step logs
(``search.quality``), after a one-line error that names it."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from fedcore_adapter import fedcore_fit
from fedcore_adapter.search.trial import open_storage
from tests.ptls_helpers import seq_to_target, target_data

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.num_clients=40", "data.min_len=6", "data.max_len=16", "data.batch_size=8"]
COLES = ["model=ptls_coles", "model.hidden_size=8", "data=ptls_coles", *SMALL, "data.cnt_min=3", "data.cnt_max=6",
         "tracking=none", "search.trials=2", "search.moves.insert=[]"]
ON_RECALL = ["search.quality=recall_top_k", "search.max_accuracy_drop=0.05", "search.objectives=[macs,recall_top_k]"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_need_evo_opt_searches_a_sequence_to_target_and_its_best_setup_runs_again_alike(tmp_path):
    setup = {"name": "PTLS", "common": {"latency_repeats": 2, "latency_warmup": 1},
             "nodes": [{"kind": "training", "epochs": 2, "learning_rate": 0.01},
                       {"kind": "pruning", "pruning_ratio": 0.5,
                        "finetune_params": {"epochs": 1, "learning_rate": 0.01}}]}
    result = fedcore_fit(seq_to_target(), target_data(), setup, output_folder=tmp_path / "PTLS", need_evo_opt=True,
                         search={"trials": 2, "objectives": ["params", "accuracy"], "max_accuracy_drop": 0.5,
                                 "moves": {"insert": []}})
    assert result.output_dir == tmp_path / "SEARCH_PTLS_SequenceToTarget"
    rows = _csv(result.output_dir / "trials.csv")
    assert [r["state"] for r in rows] == ["complete", "complete"]
    assert all(0 <= float(r["val_accuracy"]) <= 1 for r in rows)  # ptls's own torchmetrics accuracy, validation
    last = result.metrics[-1]
    assert last["params"] == sum(p.numel() for p in result.optimised_model.parameters()) < result.metrics[0]["params"]
    best = result.output_dir / "pareto" / f"trial_{int(result.notes[-1].split('#')[1].split()[0]):04d}.yaml"
    again = fedcore_fit(seq_to_target(), target_data(), str(best), output_folder=tmp_path / "again")
    assert {k: again.metrics[-1][k] for k in ("params", "macs", "loss", "accuracy")} == \
        {k: last[k] for k in ("params", "macs", "loss", "accuracy")}


def _search(tmp_path: Path, setup_file: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "fedcore_adapter", "search", f"setup={setup_file}", *COLES,
                           f"output_dir={tmp_path / 'out'}", *extra], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=600)


def test_a_coles_search_is_constrained_on_its_recall_top_k_after_a_one_line_error_naming_it(tmp_path):
    setup_file = tmp_path / "coles.yaml"
    setup_file.write_text(yaml.safe_dump({"name": "COLES", "common": {"latency_repeats": 2, "latency_warmup": 1},
                                          "nodes": [{"kind": "training", "epochs": 1},
                                                    {"kind": "low_rank", "finetune_params": {"epochs": 1}}]}))
    proc = _search(tmp_path, setup_file)  # search.quality: accuracy, which a CoLESModule does not report
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # after the prefix's log
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1]
    assert errors[0].startswith("error: search.quality = 'accuracy': the model reports no accuracy on the "
                                "validation split")
    assert "it reports recall_top_k: set search.quality to one of them" in errors[0]
    folder = tmp_path / "out" / "SEARCH_COLES_ptls_coles"
    assert "computing the shared prefix" in proc.stdout + proc.stderr
    assert not (folder / "trials").exists()  # no trial ran; the computed prefix is kept

    proc = _search(tmp_path, setup_file, "resume=true", *ON_RECALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "computing the shared prefix" not in log  # resumed from the prefix the first call computed
    assert "validation recall_top_k drop <= 5 pt" in log and "best under the constraint: trial #" in log
    state = json.loads((folder / "search.json").read_text())
    line = state["reference"]["val_recall_top_k"] - 0.05
    study = optuna.load_study(study_name="search", storage=open_storage(folder / "study.journal"))
    rows = _csv(folder / "trials.csv")
    assert [r["state"] for r in rows] == ["complete", "complete"]
    for r in rows:
        val = float(r["val_recall_top_k"])
        assert study.trials[int(r["trial"])].values == [float(r["macs"]), val]  # selected on validation recall
        assert r["feasible"] == str(val >= line)
        assert r["recall_top_k"] and r["val_accuracy"] == ""  # the held-out figure; no accuracy at all
    assert all(r["val_recall_top_k"] for r in _csv(folder / "pareto.csv"))

    proc = _search(tmp_path, setup_file, "resume=true")  # judged on recall_top_k: not on accuracy from here
    assert proc.returncode == 2
    assert "its trials were judged on search.quality=recall_top_k, not accuracy" in proc.stderr
    assert len(_csv(folder / "trials.csv")) == 2
