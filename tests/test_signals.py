"""SIGTERM and Ctrl-C end a run the same clean way (real processes, real signals): partial work removed,
run.json ``interrupted`` with the resume command, MLflow runs ended KILLED, one line, exit 143 / 130."""
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
SLOW_SETUP = """\
name: SLOW
common: {latency_repeats: 2, latency_warmup: 1}
nodes:
  - {kind: training, epochs: 1, progress: false}
  - {kind: training, epochs: 30, progress: false}
"""


def args(tmp_path: Path, tracking: bool) -> list[str]:
    (tmp_path / "slow.yaml").write_text(SLOW_SETUP)
    track = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"] if tracking else ["tracking=none"]
    return [*track, "model=custom", "model._target_=tests.helpers.build_tiny_mlp", "data=custom",
            "data._target_=tests.helpers.SlowTinyData", "setup=slow.yaml", "output_dir=out", "model_name=mlp"]


def env(sleep: str = "0.3") -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "FEDCORE_TEST_BATCH_SLEEP": sleep}


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    # A session of its own, as a terminal's foreground job: Ctrl-C is SIGINT to the whole process group.
    return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_second_node(proc: subprocess.Popen, tmp_path: Path, tracked: bool) -> None:
    """Until the run is inside its 30-epoch second node (and, tracked, its MLflow child run is open)."""
    run_json = tmp_path / "out" / "SLOW_mlp.partial" / "run.json"

    def in_second_node() -> bool:
        try:
            run = json.loads(run_json.read_text())
        except (OSError, ValueError):
            return False
        return run.get("completed_nodes") == 1 and (not tracked or bool(run["state"]["mlflow"]["parent_run_id"]))

    wait_until(in_second_node, "the second node", timeout_s=240, proc=proc, poll_s=0.2)
    if tracked:
        wait_until(lambda: sum(r.info.status == "RUNNING" for r in mlflow_runs(tmp_path)) >= 2,
                   "the second node's MLflow run", timeout_s=240, proc=proc, poll_s=0.5)
    time.sleep(1)


def mlflow_runs(tmp_path: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


def is_setup_run(run) -> bool:
    return run.data.tags.get("fedcore.role") == "setup"


def statuses(runs: list) -> dict:
    """Each run's status by its name; the setup's parent run under ``"setup"``."""
    return {("setup" if is_setup_run(r) else r.info.run_name): r.info.status for r in runs}


@pytest.mark.parametrize("signum, send_to_group, status", [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)],
                         ids=["SIGTERM", "Ctrl-C"])
def test_an_interrupted_cli_run_ends_cleanly_and_its_resume_command_finishes_it(tmp_path, signum, send_to_group,
                                                                               status):
    tracked = signum == signal.SIGTERM
    cmd = [sys.executable, "-m", "fedcore_adapter", *args(tmp_path, tracked)]
    proc = start(cmd, tmp_path)
    partial = tmp_path / "out" / "SLOW_mlp.partial"
    wait_for_second_node(proc, tmp_path, tracked)
    (os.killpg if send_to_group else os.kill)(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == status and len(lines) == 1, err
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"interrupted by {name} during node 1:training; results so far in out/SLOW_mlp.partial; "
                               f"resume with: fedcore-adapter "), lines[0]
    run = json.loads((partial / "run.json").read_text())
    assert run["status"] == "interrupted" and run["completed_nodes"] == 1 and run["error"] == lines[0]
    assert run["resume_command"].endswith(" resume=true") and run["resume_command"] in lines[0]
    assert sorted(p.name for p in (partial / "nodes").iterdir()) == ["0_input", "1_training"]  # no partial work
    if tracked:
        assert set(statuses(mlflow_runs(tmp_path)).values()) == {"FINISHED", "KILLED"}
        assert statuses(mlflow_runs(tmp_path))["setup"] == "KILLED"

    resume = shlex.split(run["resume_command"])
    assert resume[0] == "fedcore-adapter"
    done = subprocess.run([sys.executable, "-m", "fedcore_adapter", *resume[1:]], cwd=tmp_path, env=env("0"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    final = json.loads((tmp_path / "out" / "SLOW_mlp" / "run.json").read_text())
    assert final["status"] == "completed" and final["completed_nodes"] == 2
    if tracked:
        runs = statuses(mlflow_runs(tmp_path))
        assert runs["setup"] == "FINISHED" and "RUNNING" not in runs.values()


def test_a_resume_after_kill_9_ends_the_orphaned_child_run_killed(tmp_path):
    cmd = [sys.executable, "-m", "fedcore_adapter", *args(tmp_path, True)]
    proc = start(cmd, tmp_path)
    wait_for_second_node(proc, tmp_path, True)
    os.killpg(proc.pid, signal.SIGKILL)  # the logger process too: nothing ends the runs
    proc.communicate(timeout=60)
    orphans = [r for r in mlflow_runs(tmp_path) if r.info.status == "RUNNING"]
    assert len(orphans) == 2  # the parent and the second node's child run

    done = subprocess.run(cmd + ["resume=true"], cwd=tmp_path, env=env("0"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    runs = mlflow_runs(tmp_path)
    assert "RUNNING" not in {r.info.status for r in runs}
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert [r.info.run_id for r in killed] == [r.info.run_id for r in orphans if not is_setup_run(r)]


WORK_NODE = textwrap.dedent("""\
    import sys, time
    from typing import Literal
    from fedcore_adapter import run_setup
    from fedcore_adapter.registry import register_node
    from fedcore_adapter.schema import NodeConfig
    from tests.conftest import TinyDataModule, tiny_mlp

    class SlowWork(NodeConfig):
        kind: Literal["slow_work"] = "slow_work"

    @register_node(SlowWork)
    def apply(model, config, ctx):
        ctx.output_dir.mkdir(parents=True)
        (ctx.output_dir / "half.json").write_text("{")
        print("working", flush=True)
        time.sleep(300)
        return model

    try:
        run_setup({"name": "W", "common": {"latency_repeats": 2}, "nodes": [{"kind": "slow_work"}]},
                  tiny_mlp(), TinyDataModule(), output_dir=sys.argv[1])
    except KeyboardInterrupt as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(3)
""")


def test_sigterm_to_an_api_run_removes_the_nodes_partial_work(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WORK_NODE, str(tmp_path)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "working"
    assert (tmp_path / "W.partial" / "nodes" / ".1_slow_work.work" / "half.json").exists()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert err.startswith("RunInterrupted: interrupted by SIGTERM during node 0:slow_work"), err
    assert sorted(p.name for p in (tmp_path / "W.partial" / "nodes").iterdir()) == ["0_input"]
    assert json.loads((tmp_path / "W.partial" / "run.json").read_text())["status"] == "interrupted"
