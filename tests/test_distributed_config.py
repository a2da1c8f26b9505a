"""The ``cluster`` option, sweep expansion and results-folder planning (no cluster started here)."""
import os

import pytest
from hydra import compose, initialize_config_dir

from fedcore_adapter.distributed.config import parse_cluster
from fedcore_adapter.distributed.runs import separate_folders
from fedcore_adapter.distributed.sweep import compose_all, expand, varying
from fedcore_adapter.errors import ConfigError
from fedcore_adapter.resources import conf_dir


@pytest.fixture(autouse=True)
def _restore_hydra(hydra_restore_singletons):
    """Composing sets Hydra's global version base; later tests in this process must not see it."""


def composed_cluster(*overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=["tracking=none", *overrides])
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.cluster, resolve=True)


def test_cluster_local_is_a_two_process_local_cluster_on_localhost_with_the_dashboard_off():
    cfg = parse_cluster(composed_cluster("cluster=local"))
    assert (cfg.mode, cfg.local_workers(), cfg.threads_per_worker) == ("local", 2, 1)
    assert cfg.local_dashboard() is None
    assert cfg.describe() == "local cluster (2 workers x 1 thread(s), 127.0.0.1)"


def test_a_dashboard_port_is_served_on_localhost_only():
    assert parse_cluster({"name": "local", "dashboard_address": ":8787"}).local_dashboard() == "127.0.0.1:8787"


def test_cluster_none_means_a_default_local_cluster_with_one_worker_per_core():
    cfg = parse_cluster(composed_cluster())
    assert cfg.mode == "local" and cfg.local_workers() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("group", ["none", "local", "remote"])
def test_cluster_address_on_any_cluster_group_connects_to_that_scheduler(group):
    cfg = parse_cluster(composed_cluster(f"cluster={group}", "cluster.address=tcp://10.0.0.5:8786"))
    assert (cfg.mode, cfg.address, cfg.describe()) == ("address", "tcp://10.0.0.5:8786", "scheduler tcp://10.0.0.5:8786")


def test_a_cluster_manager_by_target_gets_every_other_key_as_its_arguments():
    cfg = parse_cluster(composed_cluster("cluster=slurm", "+cluster.account=proj1"))
    assert cfg.mode == "manager" and cfg.target == "dask_jobqueue.SLURMCluster"
    assert cfg.manager_kwargs() == {"queue": None, "account": "proj1", "cores": 4, "processes": 4, "memory": "16GB",
                                    "walltime": "02:00:00", "n_workers": 4}
    assert cfg.timeout == 600


def test_a_cluster_manager_that_is_not_installed_is_one_clear_error():
    from fedcore_adapter.distributed import open_client

    with pytest.raises(ConfigError) as err:
        with open_client(composed_cluster("cluster=slurm")):
            pass
    assert str(err.value) == ("cluster._target_ = 'dask_jobqueue.SLURMCluster' could not be imported: No module named "
                              "'dask_jobqueue' (install the package that provides it, e.g. pip install dask-jobqueue)")


def test_a_cluster_manager_class_that_does_not_exist_is_one_clear_error():
    from fedcore_adapter.distributed import open_client

    with pytest.raises(ConfigError) as err:
        with open_client({"_target_": "distributed.NoSuchCluster"}):
            pass
    assert str(err.value) == ("cluster._target_ = 'distributed.NoSuchCluster' could not be imported: module "
                              "'distributed' has no attribute 'NoSuchCluster' (expected package.module.ClassName "
                              "of a Dask cluster manager, e.g. dask_jobqueue.SLURMCluster)")


def test_a_sweep_on_an_unreachable_scheduler_stops_at_start_with_one_clear_error(tmp_path, monkeypatch):
    import socket
    import time

    from fedcore_adapter.distributed import sweep_main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^cluster.address = 'tcp://127.0.0.1:{port}': no Dask scheduler answered "
                                          r"within 1 s \(.*\); start one with `dask scheduler`"):
        sweep_main(["tracking=none", "setup=raw", "common.seed=1,2", "cluster=remote",
                    f"cluster.address=tcp://127.0.0.1:{port}", "cluster.timeout=1", "output_dir=out"])
    assert time.perf_counter() - start < 20
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written


def test_tls_settings_pass_through_to_the_remote_scheduler_connection():
    cfg = parse_cluster({"address": "tls://h:8786", "security": {"tls_ca_file": "ca.pem", "require_encryption": True}})
    from fedcore_adapter.distributed.cluster import _security

    security = _security(cfg)
    assert security.tls_ca_file == "ca.pem" and security.require_encryption is True


@pytest.mark.parametrize("spec, message", [
    ({"name": "local", "n_wrokers": 2},
     "cluster.n_wrokers: unknown option for cluster 'local'; allowed: _target_, address, "),
    ({"name": "local", "n_workers": 0}, "cluster.n_workers = 0: Input should be greater than or equal to 1"),
    ({"address": "localhost:8786"}, "cluster.address = 'localhost:8786': expected a scheduler address like tcp://host:8786"),
    ({"name": "local", "timeout": -1}, "cluster.timeout = -1: Input should be greater than 0"),
    ("local", "cluster must be a mapping such as cluster=local or cluster.address=tcp://host:8786 (got 'local')"),
])
def test_bad_cluster_options_are_one_line_errors_naming_field_and_value(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_cluster(spec)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_sweep_expands_into_every_combination_in_hydra_order():
    jobs = expand(["setup=raw,test", "model=mnist1d_cnn", "++common.seed=1,2"])
    assert jobs == [["setup=raw", "model=mnist1d_cnn", "++common.seed=1"],
                    ["setup=raw", "model=mnist1d_cnn", "++common.seed=2"],
                    ["setup=test", "model=mnist1d_cnn", "++common.seed=1"],
                    ["setup=test", "model=mnist1d_cnn", "++common.seed=2"]]
    assert varying(jobs)[1] == ["setup=raw", "++common.seed=2"]


def test_a_sweep_run_that_cannot_be_composed_is_reported_and_the_others_are_composed():
    composed = compose_all([["tracking=none", "model=digits_cnn"], ["tracking=none", "model=nope"]])
    cfg, choice, error = composed[0]
    assert (choice, error, cfg["model"]["_target_"]) == ("digits_cnn", None, "fedcore_adapter.zoo.models.DigitsCNN")
    assert composed[1][0] is None and "Could not find 'model/nope'" in composed[1][2] and "\n" not in composed[1][2]


def test_planned_folder_names_follow_the_engines_rule():
    from fedcore_adapter.distributed import runs
    from fedcore_adapter.results import run_folder_name

    for model in (None, "mlp"):
        assert runs.run_folder_name("RAW", model) == run_folder_name("RAW", model)


def test_the_launching_process_plans_folders_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from fedcore_adapter.distributed.runs import planned_folder; "
            "print(planned_folder({'setup': 'raw', 'output_dir': 'o', 'model_name': 'x'}), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.split() == ["o/RAW_x", "False"]


def test_runs_sharing_a_results_root_each_get_their_own_job_folder_and_a_root_of_its_own_is_kept(tmp_path):
    cfgs = [{"setup": "raw", "output_dir": "out"}, {"setup": "raw", "output_dir": "out", "common": {"seed": 2}},
            {"setup": "raw", "output_dir": "out", "model_name": "b"}, {"setup": "nope", "output_dir": "out"},
            {"setup": "raw", "output_dir": "mine"}]
    jobs = [tmp_path / str(i) for i in range(5)]
    folders = separate_folders(cfgs, jobs)
    assert [str(f) if f else None for f in folders] == [str(jobs[0] / "RAW"), str(jobs[1] / "RAW"),
                                                        str(jobs[2] / "RAW_b"), None, "mine/RAW"]
    assert [c["output_dir"] for c in cfgs] == [str(jobs[0]), str(jobs[1]), str(jobs[2]), "out", "mine"]
