"""The train / fit-target / inference commands on real pytorch-lifestream models and PtlsDataModules."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.test_entrypoints import compose

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = ["data.num_clients=40", "data.min_len=6", "data.max_len=16", "data.batch_size=8"]
COLES = ["tracking=none", "model=ptls_coles", "model.hidden_size=8", "data=ptls_coles", *SMALL_DATA,
         "data.cnt_min=3", "data.cnt_max=6", "++nodes.0.epochs=1", "++common.latency_repeats=2",
         "++common.latency_warmup=1", "limit_train_batches=2"]
TARGET = ["tracking=none", "model=ptls_seq_to_target", "model.hidden_size=8", "data=ptls_target", *SMALL_DATA,
          "++nodes.0.epochs=1", "++common.latency_repeats=2", "++common.latency_warmup=1", "limit_train_batches=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_train_then_inference_give_every_clients_coles_embedding(tmp_path):
    from fedcore_adapter.entrypoints.inference import run_inference
    from fedcore_adapter.entrypoints.train import run_train

    result = run_train(compose("train", *COLES, f"output_dir={tmp_path}", f"save_encoder={tmp_path / 'enc'}"))
    assert [row["accuracy"] for row in result.metrics] == [None, None]  # a metric-learning module: no accuracy
    assert all("recall_top_k" in row for row in result.metrics)
    written = run_inference(compose("inference", "tracking=none", "model=ptls_coles", "model.hidden_size=8",
                                    "data=ptls_target", *SMALL_DATA, "data.test_split=all",
                                    f"inference_model={tmp_path / 'enc'}", f"inference.output={tmp_path / 'emb'}"))
    frame = pd.read_csv(written[0])
    assert len(frame) == 40 and list(frame.columns) == ["target"] + [f"emb_{i:04d}" for i in range(8)]


def test_fit_target_tests_a_sequence_to_target_with_its_own_accuracy(tmp_path):
    from fedcore_adapter.entrypoints.fit_target import run_fit_target

    summary = run_fit_target(compose("fit_target", *TARGET, f"output_dir={tmp_path}"))
    assert 0 <= summary["mean"]["test_accuracy"] <= 1 and summary["mean"]["test_loss"] > 0


def test_the_train_command_runs_a_ptls_coles_module(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    flags = [a.replace("++", "") for a in COLES]
    proc = subprocess.run([sys.executable, "-m", "fedcore_adapter", "train", *flags, "model_name=coles"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results: composition_results/RAW_coles" in proc.stdout
