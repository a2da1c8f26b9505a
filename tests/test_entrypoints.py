"""The train / fit-target / inference commands (the seed's fc_train, fc_fit_target, fc_inference)."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from fedcore_adapter.checkpoint import load_model
from fedcore_adapter.data import split_batch
from fedcore_adapter.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["tracking=none", "model=custom", "model._target_=tests.helpers.build_tiny_mlp", "data=custom",
        "data._target_=tests.helpers.build_tiny_data", "++nodes.0.epochs=1", "++nodes.0.progress=false",
        "++common.latency_repeats=2", "++common.latency_warmup=1"]
SEQ = ["tracking=none", "model=seq_gru", "data=event_sequences", "data.num_samples=150", "data.n_folds=3",
       "data.eval_batch_size=16", "++nodes.0.epochs=1", "++nodes.0.progress=false", "++common.latency_repeats=2",
       "++common.latency_warmup=1", "limit_train_batches=2"]


class NoTestData:
    """A data module without a test split."""

    def __init__(self):
        from tests.conftest import TinyDataModule

        self.inner = TinyDataModule()

    def train_dataloader(self):
        return self.inner.train_dataloader()

    def val_dataloader(self):
        return self.inner.val_dataloader()


pytestmark = pytest.mark.usefixtures("one_thread")


def compose(config_name: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from fedcore_adapter.resources import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


# -- train -----------------------------------------------------------------------------------------------------
def test_train_writes_setup_model_name_results_and_saves_a_reloadable_model(tmp_path):
    from fedcore_adapter.entrypoints.train import run_train
    from tests.conftest import tiny_mlp

    cfg = compose("train", *TINY, f"output_dir={tmp_path}", "model_name=mlp", "limit_train_batches=2",
                  f"save_encoder={tmp_path / 'saved'}")
    result = run_train(cfg)
    assert result.output_dir == tmp_path / "RAW_mlp" and result.setup.common.limit_train_batches == 2
    saved = load_model(tmp_path / "saved", tiny_mlp(seed=9))
    torch.testing.assert_close(saved.state_dict(), result.optimised_model.state_dict())


def test_save_encoder_as_a_pickle_file_is_refused_before_anything_runs(tmp_path):
    from fedcore_adapter.entrypoints.train import run_train

    with pytest.raises(ConfigError, match=r"save_encoder='.*enc.pt': the model is saved as a checkpoint folder"):
        run_train(compose("train", *TINY, f"output_dir={tmp_path}", f"save_encoder={tmp_path / 'enc.pt'}"))
    assert list(tmp_path.iterdir()) == []


# -- fit-target ------------------------------------------------------------------------------------------------
def test_fit_target_compresses_and_tests_every_fold_and_writes_the_mean(tmp_path):
    from fedcore_adapter.entrypoints.fit_target import run_fit_target

    summary = run_fit_target(compose("fit_target", *SEQ, f"output_dir={tmp_path}", "model_name=gru", "fold_list=[0,2]",
                                     "embedding_validation_results.feature_name=emb"))
    written = json.loads((tmp_path / "RAW_gru_fit_target.json").read_text())
    assert [f["fold_id"] for f in written["folds"]] == [0, 2] and written["folds"][0]["feature_name"] == "emb"
    for fold in (0, 2):
        config = yaml.safe_load((tmp_path / f"RAW_gru_fold{fold}" / "config.yaml").read_text())
        assert config["data"]["fold_id"] == fold  # the data module was built for that fold
    accuracies = [f["scores_test"]["test_accuracy"] for f in written["folds"]]
    assert all(0 <= a <= 1 for a in accuracies)
    assert written["mean"]["test_accuracy"] == pytest.approx(statistics.fmean(accuracies))
    assert summary["mean"] == written["mean"]


def test_fold_list_may_be_built_by_a_target():
    from fedcore_adapter.entrypoints.fit_target import fold_ids

    assert fold_ids({"_target_": "builtins.range", "_args_": [3]}) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"fold_list='ab' must be a non-empty list of fold ids"):
        fold_ids("ab")


@pytest.mark.parametrize("overrides, error, message", [
    (["data._target_=tests.test_entrypoints.NoTestData"], DataError, r"data module NoTestData has none"),
    (["fold_list=[]"], ConfigError, r"fold_list is empty"),
])
def test_fit_target_bad_input_is_one_line_before_anything_is_written(tmp_path, overrides, error, message):
    from fedcore_adapter.entrypoints.fit_target import run_fit_target

    with pytest.raises(error, match=message):
        run_fit_target(compose("fit_target", *TINY, f"output_dir={tmp_path}", *overrides))
    assert list(tmp_path.iterdir()) == []


# -- inference -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_seq(tmp_path_factory):
    from fedcore_adapter.entrypoints.train import run_train

    root = tmp_path_factory.mktemp("seq")
    torch.set_num_threads(1)
    return run_train(compose("train", *SEQ, f"output_dir={root}", "model_name=gru"))


def test_inference_on_a_results_folder_scores_every_checkpoint_with_computational_metrics(tmp_path, trained_seq):
    from fedcore_adapter.entrypoints.inference import run_inference

    cfg = compose("inference", *SEQ, f"inference_model={trained_seq.output_dir}", f"inference.output={tmp_path}",
                  "inference.format=parquet", "n_batches_computational=1", "limit_test_batches=2")
    written = run_inference(cfg)
    assert [p.name for p in written] == ["scores_0_input.parquet", "scores_1_training.parquet"]
    frame = pd.read_parquet(written[-1])
    assert len(frame) == 2 * 16 and list(frame.columns) == ["target"] + [f"emb_{i:04d}" for i in range(64)]
    inputs, target = split_batch(next(iter(trained_seq_test_loader())))
    model = trained_seq.optimised_model.eval()
    with torch.no_grad():
        expected = model.seq_encoder({k: v for k, v in inputs.items() if k != "seq_len"}, inputs["seq_len"])
    assert torch.allclose(torch.tensor(frame.filter(like="emb_").to_numpy()[:16]), expected, atol=1e-5)
    assert frame["target"].tolist()[:16] == target.tolist()
    lines = (tmp_path / "computational.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["#0_input", "#1_training"]


def trained_seq_test_loader():
    from fedcore_adapter.zoo.sequences import EventSequenceDataModule

    return EventSequenceDataModule(num_samples=150, n_folds=3, eval_batch_size=16).test_dataloader()


@pytest.mark.parametrize("fmt, reader", [("csv", pd.read_csv), ("pickle", pd.read_pickle)])
def test_inference_on_one_checkpoint_writes_model_scores_in_the_chosen_format(tmp_path, trained_seq, fmt, reader):
    from fedcore_adapter.entrypoints.inference import run_inference

    cfg = compose("inference", *SEQ, f"inference_model={trained_seq.output_dir / 'final'}",
                  f"inference.output={tmp_path}",
                  f"inference.format={fmt}", "inference.encoder_only=false", "inference.split=val",
                  "limit_predict_batches=1")
    [path] = run_inference(cfg)
    frame = reader(path)
    assert path.name == f"scores.{'pkl' if fmt == 'pickle' else fmt}"
    assert list(frame.columns) == ["target", "score_0000", "score_0001", "score_0002", "score_0003"]
    assert len(frame) == 10  # the whole validation split, in one batch


@pytest.mark.parametrize("overrides, message", [
    (["inference_model=nothing_here"], r"inference_model='nothing_here': no checkpoints there"),
    (["inference_model=.", "inference.format=xlsx"],
     r"inference.format='xlsx' is not supported; allowed: csv, parquet, pickle"),
    (["inference_model=."], r"inference_model='.': no checkpoints there"),
])
def test_inference_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, overrides, message):
    from fedcore_adapter.entrypoints.inference import run_inference

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        run_inference(compose("inference", *TINY, f"inference.output={tmp_path / 'out'}", *overrides))
    assert not (tmp_path / "out").exists()


# -- the commands ----------------------------------------------------------------------------------------------
def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-m", "fedcore_adapter", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_commands_run_and_fail_with_one_line(tmp_path):
    flags = [a.replace("++", "") for a in TINY]
    proc = cli("train", *flags, "model_name=mlp", "limit_train_batches=2", "save_encoder=enc", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "results: composition_results/RAW_mlp" in proc.stdout and "model saved: enc" in proc.stdout
    proc = cli("inference", *flags, "inference_model=missing", "inference.output=out", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: inference_model='missing': no checkpoints there (expected a checkpoint folder with manifest.json, "
        "a results folder, a .pt/.pth state-dict file, a model.onnx / model.xml / model.pt2 artifact, "
        "or a folder of these)"]


@pytest.mark.parametrize("command", ["train", "fit-target", "inference"])
def test_an_unknown_config_option_or_key_is_one_line_and_status_2(tmp_path, command):
    proc = cli(command, "model=nope", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Could not find 'model/nope' Available options in 'model': custom digits_cnn" in lines[0]
    for override in ("modle_name=x", "+modle_name=x"):  # Hydra would add a +key that nothing reads
        proc = cli(command, override, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"error: unknown key 'modle_name' in '{override}' (did you mean model_name?); "
                                   f"the config's keys: cluster, common, data, "), proc.stderr
    assert not (tmp_path / "composition_results").exists()


def test_the_commands_name_the_tracked_model_as_the_main_command_does():
    from fedcore_adapter.entrypoints.common import fit_options

    cfg = yaml.safe_load((ROOT / "conf" / "model" / "seq_gru.yaml").read_text())
    config = {"model": cfg, "data": {"_target_": "my_pkg.MyData"}, "tracking": {"name": "mlflow"}}
    hook = fit_options(config, Path("out"))["hooks"][0]
    assert hook.model_label == "seq_gru" and hook.config.experiment == "seq_gru on MyData"  # the option, not the class
    named = fit_options({**config, "model_name": "mine"}, Path("out"))["hooks"][0]
    assert named.model_label == "mine" and named.config.experiment == "mine on MyData"
