"""The recovery probe starts a trial's final distillation from the checkpoint of the node before it, and refuses a
trial whose chain does not end in one."""
from __future__ import annotations

import pytest
import yaml

from benchmarks.search.recovery import distillation_input


def _trial(tmp_path, kinds, saved):
    nodes = [{"kind": k} for k in kinds]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {}, "setup_resolved": {"name": "t",
                                                                                            "nodes": nodes}}))
    for i, name in enumerate(["input", *kinds]):
        folder = tmp_path / "nodes" / f"{i}_{name}"
        folder.mkdir(parents=True)
        if name in saved:
            (folder / "state.pt").write_bytes(b"")
    return tmp_path


def test_the_distillation_starts_from_the_node_before_it_and_runs_alone(tmp_path):
    trial = _trial(tmp_path, ["low_rank", "pruning", "distillation"], {"input", "low_rank", "pruning"})
    cfg, setup, start = distillation_input(trial)
    assert start == trial / "nodes" / "2_pruning"
    assert [n["kind"] for n in setup["nodes"]] == ["distillation"] and "setup_resolved" not in cfg


@pytest.mark.parametrize("kinds, saved, message", [
    (["pruning", "low_rank"], {"pruning"}, "does not end in a distillation"),
    (["pruning", "distillation"], {"input"}, "no checkpoint"),
])
def test_a_trial_without_a_final_distillation_to_rerun_is_refused(tmp_path, kinds, saved, message):
    with pytest.raises(SystemExit, match=message):
        distillation_input(_trial(tmp_path, kinds, saved))
