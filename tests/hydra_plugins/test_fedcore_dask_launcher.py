"""``hydra/launcher=dask``: Hydra's own launcher test suites, plugin discovery, and fedcore sweeps on Dask."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from fedcore_adapter.distributed import open_client

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scheduler_address():
    """A local cluster the suites' jobs run on, reached by address (each job: one Dask task)."""
    # plain TCP (security=false): the jobs' processes reach it by address, without its credentials
    with open_client({"name": "local", "n_workers": 2, "threads_per_worker": 1, "security": False}) as client:
        yield client.scheduler.address


@pytest.fixture(autouse=True)
def pristine_version_base(hydra_restore_singletons):
    """Hydra's suites are written for apps that set no version_base; other tests of this process may have set one."""
    from hydra.version import VersionBase

    VersionBase.set_instance(VersionBase())


@pytest.fixture
def launcher_name() -> str:
    return "dask"


@pytest.fixture
def overrides(scheduler_address) -> list:
    return [f"+hydra.launcher.cluster.address={scheduler_address}"]


@pytest.fixture
def task_launcher_cfg() -> dict:
    return {}


@pytest.fixture
def extra_flags(scheduler_address) -> list:
    return ["-m", "hydra/launcher=dask", f"+hydra.launcher.cluster.address={scheduler_address}"]


class TestDaskLauncher(LauncherTestSuite):
    """Hydra's launcher test suite, jobs run in the cluster's worker processes."""


class TestDaskLauncherIntegration(IntegrationTestSuite):
    """Hydra's integration suite: real apps started as processes, sweeping on the cluster. Each app start
    costs seconds, so the parametrised tests keep their most demanding case (the others vary only the
    config that Hydra composes before any launcher is involved)."""

    @pytest.mark.parametrize("task_config, overrides, filename, expected_name", [pytest.param(
        {"hydra": {"job": {"name": "name_from_config_file"}}}, ["hydra.job.name=overridden_name"], "with_config.py",
        "overridden_name", id="different_filename_and_config_file_name_override_and_command_line_override")])
    def test_custom_task_name(self, tmpdir, task_config, overrides, filename, expected_name, task_launcher_cfg,
                              extra_flags):
        super().test_custom_task_name(tmpdir, task_config, overrides, filename, expected_name, task_launcher_cfg,
                                      extra_flags)

    @pytest.mark.parametrize("task_config, overrides, expected_dir", [pytest.param(
        {"hydra": {"sweep": {"dir": "hydra_cfg", "subdir": "${hydra.job.override_dirname}"},
                   "job": {"config": {"override_dirname": {"kv_sep": "_", "item_sep": "+", "exclude_keys": ["seed"]}}}},
         "a": "hello", "b": 20, "seed": "???"}, ["a=1", "b=2", "seed=10"], "hydra_cfg/a_1+b_2",
        id="subdir:custom_override_dirname")])
    def test_custom_sweeper_run_workdir(self, tmpdir, task_config, overrides, expected_dir, task_launcher_cfg,
                                        extra_flags):
        super().test_custom_sweeper_run_workdir(tmpdir, task_config, overrides, expected_dir, task_launcher_cfg,
                                                extra_flags)


def test_the_launcher_is_discovered_without_importing_dask_at_hydra_start():
    code = ("import sys; from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher; "
            "names = [c.__name__ for c in Plugins.instance().discover(Launcher)]; "
            "print('DaskLauncher' in names, 'dask' in sys.modules or 'distributed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_a_fedcore_multirun_on_dask_completes_every_good_job_and_reports_the_bad_one_in_one_line(
        scheduler_address, tmp_path):
    (tmp_path / "bad.yaml").write_text("name: BAD\nnodes: [{kind: training, learning_rate: -1}]\n")
    args = ["-m", "hydra/launcher=dask", f"cluster.address={scheduler_address}", "tracking=none", "model=custom",
            "model._target_=tests.helpers.build_tiny_mlp", "data=custom", "data._target_=tests.helpers.build_tiny_data",
            "nodes.0.epochs=1", "nodes.0.progress=false", "common.latency_repeats=2", "setup=raw,bad.yaml",
            "model_name=a,b", "output_dir=out"]
    proc = subprocess.run([sys.executable, "-m", "fedcore_adapter", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]  # the first failed job: its error only
    assert lines[-3].startswith("Error executing job with overrides: [") and "'setup=bad.yaml'" in lines[-3]
    assert lines[-2:] == ["nodes[0] (training).learning_rate = -1: Input should be greater than 0",
                          "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."], lines[-6:]
    assert "Traceback" not in proc.stderr
    sweep = next((tmp_path / "out" / "sweeps").iterdir())
    for job, name in (("0", "RAW_a"), ("1", "RAW_b")):  # every job in its own job folder
        assert json.loads((sweep / job / name / "run.json").read_text())["status"] == "completed"
    record = json.loads((sweep / "sweep.json").read_text())
    where = str(sweep.relative_to(tmp_path))
    assert [(r["label"], r["status"], r["output_dir"]) for r in record] == [
        ("setup=raw model_name=a", "completed", f"{where}/0/RAW_a"),
        ("setup=raw model_name=b", "completed", f"{where}/1/RAW_b"),
        ("setup=bad.yaml model_name=a", "failed", None), ("setup=bad.yaml model_name=b", "failed", None)]
    table = (sweep / "comparison.csv").read_text()
    assert "RAW_a" in table and "RAW_b" in table and "BAD" not in table
    assert (sweep / "comparison.md").exists() and (sweep / "comparison.png").stat().st_size > 0  # table and plot
