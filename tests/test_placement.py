"""A run owns its folder: finished and live folders are never replaced, stale ones are resumed or discarded."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcore_adapter import placement, run_setup
from fedcore_adapter.errors import ConfigError
from fedcore_adapter.hooks import Hook
from fedcore_adapter.placement import live_owner, owner_fields
from fedcore_adapter.signals import RunInterrupted
from tests.conftest import tiny_mlp, tiny_setup
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def unfinished(folder: Path, **run_json) -> Path:
    """An unfinished run's folder as a run leaves it (run.json, one finished node)."""
    (folder / "nodes" / "0_input").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": "running", "setup_hash": "x", **run_json}))
    return folder


def test_a_rerun_gets_the_next_number_and_the_finished_folder_stays(tmp_path, dm):
    first = run_setup(tiny_setup(name="R"), tiny_mlp(), dm, output_dir=tmp_path, model_name="mlp")
    before = (first.output_dir / "nodes" / "1_training" / "state.pt").read_bytes()
    second = run_setup(tiny_setup(name="R"), tiny_mlp(seed=1), dm, output_dir=tmp_path, model_name="mlp")
    third = run_setup(tiny_setup(name="R"), tiny_mlp(seed=2), dm, output_dir=tmp_path, model_name="mlp")
    assert [first.output_dir.name, second.output_dir.name, third.output_dir.name] == ["R_mlp", "R_mlp-2", "R_mlp-3"]
    assert (first.output_dir / "nodes" / "1_training" / "state.pt").read_bytes() == before
    assert json.loads((third.output_dir / "run.json").read_text())["run_name"] == "R_mlp-3"


def test_run_json_names_its_owner_and_the_heartbeat_moves_while_it_runs(tmp_path, dm, monkeypatch):
    monkeypatch.setattr(placement, "HEARTBEAT_S", 0.2)
    seen = []

    class Watch(Hook):
        def before_node(self, run, index, node):
            seen.append(json.loads((run.output_dir / "run.json").read_text()))
            time.sleep(2.5)  # a long node: only the heartbeat thread writes meanwhile
            seen.append(json.loads((run.output_dir / "run.json").read_text()))

    run_setup(tiny_setup(name="H"), tiny_mlp(), dm, output_dir=tmp_path, hooks=[Watch()])
    before, after = seen
    assert before["pid"] == os.getpid() and before["host"] == socket.gethostname() and before["started_at"]
    assert live_owner(before) is not None
    assert after["heartbeat_at"] > before["heartbeat_at"] and after["completed_nodes"] == 0


def test_a_live_runs_folder_is_never_touched_a_new_run_goes_beside_it(tmp_path, dm):
    live = unfinished(tmp_path / "L.partial", started_at="2026-01-01T00:00:00+00:00", **owner_fields())
    result = run_setup(tiny_setup(name="L"), tiny_mlp(), dm, output_dir=tmp_path)
    assert result.output_dir == tmp_path / "L-2"
    assert (live / "nodes" / "0_input").is_dir() and json.loads((live / "run.json").read_text())["setup_hash"] == "x"


def test_resuming_a_live_runs_folder_is_refused_in_one_line_naming_the_owner(tmp_path, dm):
    unfinished(tmp_path / "L.partial", **owner_fields())
    with pytest.raises(ConfigError, match=rf"cannot resume .*L.partial: a live run owns it \(pid {os.getpid()} on "
                                          rf"host {socket.gethostname()}.*heartbeat"):
        run_setup(tiny_setup(name="L"), tiny_mlp(), dm, output_dir=tmp_path, resume=True)
    assert (tmp_path / "L.partial" / "nodes" / "0_input").is_dir()


def test_a_stale_folder_owner_dead_is_discarded_by_a_new_run(tmp_path, dm):
    unfinished(tmp_path / "S.partial", pid=dead_pid(), host=socket.gethostname())
    result = run_setup(tiny_setup(name="S"), tiny_mlp(), dm, output_dir=tmp_path)
    assert result.output_dir == tmp_path / "S" and not (tmp_path / "S.partial").exists()


def test_a_folder_of_another_host_is_stale_only_when_its_heartbeat_is_old(tmp_path, dm):
    fresh = placement.now_iso()
    unfinished(tmp_path / "A.partial", pid=1, host="elsewhere", heartbeat_at=fresh)
    unfinished(tmp_path / "B.partial", pid=1, host="elsewhere", heartbeat_at="2026-01-01T00:00:00+00:00")
    assert run_setup(tiny_setup(name="A"), tiny_mlp(), dm, output_dir=tmp_path).output_dir == tmp_path / "A-2"
    assert run_setup(tiny_setup(name="B"), tiny_mlp(), dm, output_dir=tmp_path).output_dir == tmp_path / "B"


def test_resume_after_a_kill_before_anything_was_recorded_starts_over_without_a_false_reason(tmp_path, dm, caplog):
    """kill -9 between creating the folder and writing run.json left a folder with no run.json."""
    (tmp_path / "K.partial" / "nodes").mkdir(parents=True)
    result = run_setup(tiny_setup(name="K"), tiny_mlp(), dm, output_dir=tmp_path, resume=True)
    assert result.output_dir == tmp_path / "K"
    assert json.loads((tmp_path / "K" / "run.json").read_text())["status"] == "completed"
    assert "setup differs" not in caplog.text
    assert "pass resume=true" not in caplog.text  # it was passed: the line says there was nothing to continue
    assert f"resume=true: nothing to resume in {tmp_path / 'K.partial'} (it stopped before recording anything)" \
        in caplog.text


def test_the_results_folder_that_cannot_be_created_is_one_line(tmp_path, dm):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^output_dir = '.*file/out': cannot create or write the results folder "
                                          r"there \(Not a directory\); choose a writable folder"):
        run_setup(tiny_setup(), tiny_mlp(), dm, output_dir=tmp_path / "file" / "out")


FAST = ["tracking=none", "model=custom", "model._target_=tests.helpers.build_tiny_mlp", "data=custom",
        "data._target_=tests.helpers.SlowTinyData", "nodes.0.epochs=3", "nodes.0.progress=false",
        "common.latency_repeats=2", "output_dir=out", "model_name=mlp"]


def start_cli(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDCORE_TEST_BATCH_SLEEP": "0.3"}
    return subprocess.Popen([sys.executable, "-m", "fedcore_adapter", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_cli_runs_racing_for_one_name_both_keep_their_results(tmp_path):
    first = start_cli(tmp_path, *FAST)
    wait_until((tmp_path / "out" / "RAW_mlp.partial" / "run.json").exists, "the first run", timeout_s=240, proc=first)
    second = start_cli(tmp_path, *FAST)
    outs = [p.communicate(timeout=600) for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outs
    printed = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("results:"))
    assert printed == ["results: out/RAW_mlp", "results: out/RAW_mlp-2"]
    pids = set()
    for name in ("RAW_mlp", "RAW_mlp-2"):
        folder = tmp_path / "out" / name
        assert {"config.yaml", "run.json", "metrics.json", "final"} <= {p.name for p in folder.iterdir()}
        assert sorted(p.name for p in (folder / "nodes").iterdir()) == ["0_input", "1_training"]
        run = json.loads((folder / "run.json").read_text())
        assert run["status"] == "completed" and run["run_name"] == name
        pids.add(run["pid"])
    assert pids == {first.pid, second.pid}
    assert not list((tmp_path / "out").glob("*.partial"))


def test_a_rerun_task_that_cannot_see_its_lost_attempts_folder_says_it_restarted(tmp_path, dm, caplog):
    """A Dask task run again after its worker died, on a machine where the results folder is not shared."""
    token = placement.RUN_ATTEMPT.set({"token": "fedcore-run-0-abc", "attempt": 2})
    try:
        result = run_setup(tiny_setup(name="X"), tiny_mlp(), dm, output_dir=tmp_path)
    finally:
        placement.RUN_ATTEMPT.reset(token)
    assert "previous attempt was lost with its worker and its results folder is not visible here" in caplog.text
    assert "restarts from the first node" in caplog.text
    assert json.loads((result.output_dir / "run.json").read_text())["attempt"] == 2


def test_resume_with_nothing_to_resume_says_so_in_one_line_and_starts_a_new_run(tmp_path, dm, caplog):
    result = run_setup(tiny_setup(name="N"), tiny_mlp(), dm, output_dir=tmp_path, resume=True)
    assert result.output_dir == tmp_path / "N"
    assert json.loads((tmp_path / "N" / "run.json").read_text())["status"] == "completed"
    lines = [r.getMessage() for r in caplog.records if "nothing to resume" in r.getMessage()]
    assert lines == [f"resume=true: nothing to resume under {tmp_path} (no unfinished or finished N run there); "
                     f"starting a new run"]


def test_resume_of_an_unfinished_run_continues_it_without_the_nothing_to_resume_line(tmp_path, dm, caplog):
    class InterruptAfterTheFirstNode(Hook):
        def after_node(self, run, index, node, model, row, checkpoint):
            raise KeyboardInterrupt  # a BaseException: not swallowed as a hook's own failure

    setup = tiny_setup({"kind": "training", "epochs": 1}, {"kind": "training", "epochs": 1}, name="R")
    with pytest.raises(RunInterrupted):
        run_setup(setup, tiny_mlp(), dm, output_dir=tmp_path, hooks=[InterruptAfterTheFirstNode()])
    assert json.loads((tmp_path / "R.partial" / "run.json").read_text())["completed_nodes"] == 1
    caplog.clear()
    result = run_setup(setup, tiny_mlp(), dm, output_dir=tmp_path, resume=True)
    assert result.output_dir == tmp_path / "R"
    assert json.loads((tmp_path / "R" / "run.json").read_text()).get("resumed_at")
    assert "nothing to resume" not in caplog.text
