"""Early stopping judges the model each node hands on (its last epoch's validation accuracy) and never stops the
chain's last node at its end; inside a node it stops only a trial that even the largest recovery finished nodes of
the same kind showed would leave below the line, two epochs in a row (each pruning step dips, the fine-tune
recovers)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from fedcore_adapter.registry import get_node
from fedcore_adapter.search.trial import (ENTRY_FILE, EarlyStopHook, TrialStopped, largest_gains,
                                          open_storage, recovery_gain)

PRUNING = get_node("pruning").config_cls.model_validate({"kind": "pruning"})
RUN = SimpleNamespace(setup=SimpleNamespace(nodes=[PRUNING] * 3))


def _hook(tmp_path, lower=0.9, patience=0, **spec) -> EarlyStopHook:
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="fidelity", storage=open_storage(path), direction="maximize",
                                load_if_exists=True)
    trial = study.ask()
    return EarlyStopHook({"storage": str(path), "study": "fidelity", "trial_id": trial._trial_id,
                          "lower": lower, "patience": patience, **spec})


def _node(hook: EarlyStopHook, index: int, accuracies: list[float], phases: list[str] | None = None) -> None:
    hook.before_node(RUN, index, PRUNING)
    for step, acc in enumerate(accuracies):
        tag = phases[step] if phases else "pruning"
        hook.on_log(RUN, index, PRUNING, {f"{tag}/val_accuracy": acc, f"{tag}/val_loss": 1.0}, step)
    hook.after_node(RUN, index, PRUNING, None, {}, None)


def test_a_node_that_dips_below_the_line_and_recovers_by_its_end_is_not_stopped(tmp_path):
    hook = _hook(tmp_path)
    _node(hook, 0, [0.5, 0.6, 0.4, 0.7, 0.95])  # iterative pruning: every step dips, the fine-tune recovers
    assert hook.last == 0.95 and hook.epochs == 5 and hook.step == 1


def test_a_node_that_ends_below_the_line_stops_the_trial_before_the_next_node(tmp_path):
    hook = _hook(tmp_path)
    _node(hook, 0, [0.95])
    with pytest.raises(TrialStopped, match=r"0\.8000 at the end of node 1: pruning \(after 4 epochs\) below 0\.9000"):
        _node(hook, 1, [0.99, 0.85, 0.8])  # the node's last epoch is what it hands on


def test_the_last_node_is_never_stopped_the_trial_completes_and_is_judged(tmp_path):
    hook = _hook(tmp_path)
    _node(hook, 2, [0.1])
    assert hook.step == 0


def test_a_node_without_epochs_reports_nothing(tmp_path):
    hook = _hook(tmp_path)
    _node(hook, 0, [])
    assert hook.step == 0 and hook.last is None


def test_patience_lets_a_trial_go_on_while_it_has_not_stopped_improving_for_that_many_node_ends(tmp_path):
    hook = _hook(tmp_path, patience=1)
    run = SimpleNamespace(setup=SimpleNamespace(nodes=[PRUNING] * 5))
    for index, acc in enumerate([0.8, 0.7]):
        hook.before_node(run, index, PRUNING)
        hook.on_log(run, index, PRUNING, {"val_accuracy": acc}, 0)
        hook.after_node(run, index, PRUNING, None, {}, None)  # below the line, but not yet "no improvement" long
    hook.before_node(run, 2, PRUNING)
    hook.on_log(run, 2, PRUNING, {"val_accuracy": 0.6}, 0)
    with pytest.raises(TrialStopped):
        hook.after_node(run, 2, PRUNING, None, {}, None)


def test_in_a_search_a_trial_whose_first_compression_node_ends_below_the_line_stops_there(tmp_path):
    from fedcore_adapter.search.driver import run_search
    from tests.search.helpers import SETUP, config

    cfg = config(tmp_path, trials=1, max_accuracy_drop=0.0, moves={"drop": False, "insert": [], "reorder": False},
                 early_stop={"enabled": True, "margin": 0.0, "patience": 0},
                 space={"pruning": {"pruning_ratio": {"low": 0.94, "high": 0.96}}})
    prune = {"kind": "pruning", "pruning_ratio": 0.95, "finetune_params": {"epochs": 1, "learning_rate": 1e-5}}
    cfg["setup"] = {**SETUP, "nodes": [SETUP["nodes"][0], prune, dict(prune)]}
    result = run_search(cfg)
    (row,) = result.trials
    assert row["state"] == "pruned", row
    assert "at the end of node 0: pruning" in row["error"]  # the stop's reason
    nodes = result.folder / "trials" / "trial_0000.partial" / "nodes"  # the stopped run's folder
    assert sorted(p.name for p in nodes.iterdir()) == ["0_input", "1_pruning"]  # the second node never ran


def test_in_a_search_a_node_end_a_distillation_follows_runs_on_until_distillations_showed_their_recovery(tmp_path):
    """The first trial's pruning ends below the line; no distillation has finished yet, so its own runs (and is
    the first the next node ends are judged by). Each node end is written beside its checkpoint."""
    from fedcore_adapter.search.driver import run_search
    from tests.search.helpers import SETUP, config

    cfg = config(tmp_path, trials=1, max_accuracy_drop=0.0, moves={"drop": False, "insert": [], "reorder": False},
                 early_stop={"enabled": True, "margin": 0.0, "patience": 0, "recovered_by": ["distillation"]},
                 space={"pruning": {"pruning_ratio": {"low": 0.94, "high": 0.96}}, "distillation": False})
    prune = {"kind": "pruning", "pruning_ratio": 0.95, "finetune_params": {"epochs": 1, "learning_rate": 1e-5}}
    distill = {"kind": "distillation", "epochs": 1, "learning_rate": 1e-5}
    cfg["setup"] = {**SETUP, "nodes": [SETUP["nodes"][0], prune, distill]}
    result = run_search(cfg)
    (row,) = result.trials
    assert row["state"] == "complete", row
    nodes = Path(row["output_dir"]) / "nodes"
    assert sorted(p.name for p in nodes.iterdir()) == ["0_input", "1_pruning", "2_distillation"]
    entry = json.loads((nodes / "1_pruning" / ENTRY_FILE).read_text())["val_accuracy"]
    line = json.loads((result.folder / "search.json").read_text())["reference"]["val_accuracy"]  # 0 drop, 0 margin
    assert entry < line  # the plain node-end rule would have stopped it there


def test_a_stopped_trials_finished_nodes_are_a_prefix_later_trials_start_from(tmp_path):
    """A candidate that shares the nodes a stopped trial finished starts after them (its run holds only the
    rest), as it would after a complete trial: local moves around a stopped parent do not redo its work."""
    from fedcore_adapter.search.driver import run_search
    from tests.search.helpers import SETUP, config

    cfg = config(tmp_path, trials=2, max_accuracy_drop=0.0, moves={"drop": False, "insert": [], "reorder": False},
                 early_stop={"enabled": True, "margin": 0.0, "patience": 0},
                 space={"pruning": {"pruning_ratio": {"low": 0.94, "high": 0.96}}})
    prune = {"kind": "pruning", "pruning_ratio": 0.95, "finetune_params": {"epochs": 1, "learning_rate": 1e-5}}
    cfg["setup"] = {**SETUP, "nodes": [SETUP["nodes"][0], prune, dict(prune)]}
    first = {"pruning#1.pruning_ratio": 0.95, "pruning#1.importance": "magnitude"}
    asked = [{**first, "pruning#2.pruning_ratio": 0.95, "pruning#2.importance": "magnitude"},
             {**first, "pruning#2.pruning_ratio": 0.94, "pruning#2.importance": "lamp"}]

    def loop(search, pool):
        for params in asked:  # one after the other: the second is asked once the first has stopped
            search.submit(pool, params)
            while search.in_flight:
                search.collect(pool, timeout=5)

    result = run_search(cfg, loop=loop)
    stopped, second = result.trials
    assert stopped["state"] == "pruned" and "at the end of node 0: pruning" in stopped["error"]
    assert int(stopped["start_node"]) == 1 and int(second["start_node"]) == 2  # after the stopped trial's pruning#1
    nodes = sorted(p.name for p in (Path(second["output_dir"]) / "nodes").iterdir())
    assert nodes == ["0_input", "1_pruning"]  # its own run: the second pruning only


def test_the_largest_gain_per_epoch_is_taken_over_finished_curves_of_the_same_kind_and_length():
    curves = [{"key": "pruning:7", "values": [0.5, 0.9, 0.95]}, {"key": "pruning:7", "values": [0.8, 0.7, 0.96]},
              {"key": "pruning:7", "values": [0.9, 0.9, 0.9]}, {"key": "pruning:7", "values": [0.1, 0.99]},
              {"key": "low_rank:7", "values": [0.0, 0.0, 1.0]}]
    assert largest_gains(curves, "pruning:7", 3) == pytest.approx([0.45, 0.26, 0.0])
    assert largest_gains(curves, "pruning:7", 4) is None  # too few of them to judge by
    assert largest_gains(curves, "training:7", 1) is None


def _finish_others(tmp_path, curves, last=True, phases=None):
    """Other trials of the search finish nodes with these epoch curves (stored on their fidelity twins)."""
    for curve in curves:
        _node(_hook(tmp_path, within_nodes=True), 2 if last else 0, curve, phases)


def test_inside_a_node_a_trial_that_even_the_best_recovery_seen_leaves_below_the_line_stops(tmp_path):
    _finish_others(tmp_path, [[0.90, 0.93, 0.96, 0.97], [0.85, 0.95, 0.96, 0.98], [0.96, 0.97, 0.97, 0.98]])
    hook = _hook(tmp_path, within_nodes=True)  # largest gains per epoch: 0.13, 0.04, 0.02, 0
    with pytest.raises(TrialStopped, match=r"0\.8200 at epoch 2 of 4 of node 2: pruning \(after 2 epochs\): "
                                           r"with the largest recovery a finished pruning node showed from there "
                                           r"\(\+0\.0400\) still below 0\.9000"):
        _node(hook, 2, [0.70, 0.82, 0.9, 0.9])  # the chain's last node too: it would end infeasible
    assert hook.epochs == 2


def test_inside_a_node_one_epoch_dipping_past_the_best_recovery_seen_is_not_enough(tmp_path):
    _finish_others(tmp_path, [[0.90, 0.93, 0.96, 0.97], [0.85, 0.95, 0.96, 0.98], [0.96, 0.97, 0.97, 0.98]])
    hook = _hook(tmp_path, within_nodes=True)
    _node(hook, 0, [0.70, 0.90, 0.95, 0.97])  # a deeper dip than any seen, recovered at once
    assert hook.epochs == 4 and hook.last == 0.97


def test_inside_a_node_nothing_is_judged_before_min_curves_nodes_of_its_kind_finished(tmp_path):
    _finish_others(tmp_path, [[0.90, 0.93, 0.96, 0.97], [0.85, 0.95, 0.96, 0.98]])
    hook = _hook(tmp_path, within_nodes=True, min_curves=3)
    _node(hook, 2, [0.1, 0.1, 0.1, 0.1])
    assert hook.epochs == 4
    off = _hook(tmp_path, within_nodes=False)
    _finish_others(tmp_path, [[0.96, 0.97, 0.97, 0.98]])
    _node(off, 2, [0.1, 0.1, 0.1, 0.1])  # within_nodes false: only node ends are judged
    assert off.epochs == 4


# two pruning steps with a fine-tune each: the second step's fine-tune (epochs 3-5) is the node's final phase
STEPS = ["finetune_1", "finetune_1", "finetune_2", "finetune_2", "finetune_2"]
FINISHED = [[0.95, 0.97, 0.90, 0.94, 0.96], [0.93, 0.96, 0.88, 0.93, 0.97], [0.96, 0.97, 0.91, 0.95, 0.97]]


def test_every_finished_nodes_curve_is_kept_with_its_epochs_training_phases(tmp_path):
    _finish_others(tmp_path, FINISHED[:1], phases=STEPS)
    study = optuna.load_study(study_name="fidelity", storage=open_storage(tmp_path / "study.journal"))
    (curve,) = study.trials[0].user_attrs["curves"]
    assert curve == {"key": curve["key"], "kind": "pruning", "node": 2, "values": FINISHED[0], "phases": STEPS,
                     "entry": None, "end": FINISHED[0][-1], "epochs": 0}  # epochs: as configured (PRUNING: none)


def test_final_phase_judges_only_the_fine_tune_after_the_last_structural_step(tmp_path):
    _finish_others(tmp_path, FINISHED, phases=STEPS)  # largest gains: 0.04, 0.01, 0.09, 0.04, 0
    early = _hook(tmp_path, within_nodes="final_phase")
    _node(early, 2, [0.70, 0.72, 0.95, 0.96, 0.97], STEPS)  # far below in the first step: not judged there
    assert early.epochs == 5
    late = _hook(tmp_path, within_nodes="final_phase")
    with pytest.raises(TrialStopped, match=r"0\.8000 at epoch 4 of 5 of node 2: pruning \(after 4 epochs\)"):
        _node(late, 2, [0.95, 0.97, 0.78, 0.80, 0.82], STEPS)  # the last step's fine-tune cannot reach 0.9
    assert late.epochs == 4


def test_all_judges_every_epoch_and_a_bool_reads_as_all_or_off(tmp_path):
    from fedcore_adapter.search.config import EarlyStop

    _finish_others(tmp_path, FINISHED, phases=STEPS)
    hook = _hook(tmp_path, within_nodes="all")
    with pytest.raises(TrialStopped, match="at epoch 2 of 5"):
        _node(hook, 2, [0.70, 0.72, 0.95, 0.96, 0.97], STEPS)
    assert [EarlyStop(within_nodes=v).within_nodes for v in (True, False, "final_phase")] == \
        ["all", "off", "final_phase"]


def test_phase_ends_also_judges_the_last_epoch_of_each_earlier_phase(tmp_path):
    _finish_others(tmp_path, FINISHED, phases=STEPS)  # judged: epoch 2 (the first step's fine-tune ends), 3, 4
    curve = [0.95, 0.85, 0.80, 0.95, 0.96]  # below after the first step's fine-tune and the last step
    ends = _hook(tmp_path, within_nodes="phase_ends")
    with pytest.raises(TrialStopped, match="at epoch 3 of 5"):
        _node(ends, 2, curve, STEPS)
    final = _hook(tmp_path, within_nodes="final_phase")  # (a stopped node's curve is not kept: same envelope)
    _node(final, 2, curve, STEPS)  # epoch 4 recovers: the final phase alone never has two below in a row
    assert final.epochs == 5


# A distillation after a compression node: the node end before it is judged by how far distillations recovered
DISTILL = get_node("distillation").config_cls.model_validate({"kind": "distillation", "epochs": 6})
TO_DISTILL = SimpleNamespace(setup=SimpleNamespace(nodes=[PRUNING, PRUNING, DISTILL]))


def _chain(hook: EarlyStopHook, ends: list[float], distill: list[float] | None = None, checkpoints=None) -> None:
    """A trial of TO_DISTILL: each pruning node ends at ``ends``; the distillation runs ``distill``."""
    for index, acc in enumerate(ends):
        hook.before_node(TO_DISTILL, index, PRUNING)
        hook.on_log(TO_DISTILL, index, PRUNING, {"val_accuracy": acc}, 0)
        hook.after_node(TO_DISTILL, index, PRUNING, None, {}, checkpoints[index] if checkpoints else None)
    if distill is not None:
        hook.before_node(TO_DISTILL, 2, DISTILL)
        for step, acc in enumerate(distill):
            hook.on_log(TO_DISTILL, 2, DISTILL, {"distillation/val_accuracy": acc}, step)
        hook.after_node(TO_DISTILL, 2, DISTILL, None, {}, None)


def test_the_recovery_judged_is_the_largest_a_kind_showed_from_an_entry_below_the_line_never_below_zero():
    def curve(entry, end, kind="distillation", epochs=6):
        return {"kind": kind, "entry": entry, "end": end, "epochs": epochs}

    below = [curve(0.85, 0.95), curve(0.88, 0.91), curve(0.80, 0.86, epochs=9)]
    others = [curve(0.95, 0.99),  # from above the line: says nothing of what a node below recovers
              curve(0.70, 0.99, epochs=3),  # fewer epochs than the node judged
              curve(0.70, 0.99, kind="training"), curve(None, 0.99), {"key": "distillation:7", "values": [0.9]}]
    assert recovery_gain(below + others, "distillation", 6, 0.9, 3) == pytest.approx(0.10)
    assert recovery_gain(below + others, "distillation", 6, 0.9, 4) is None  # too few to judge by
    assert recovery_gain(below + others, "distillation", 9, 0.9, 1) == pytest.approx(0.06)
    assert recovery_gain([curve(0.89, 0.88)], "distillation", 6, 0.9, 1) == 0.0  # never stricter than the line


def test_a_node_end_a_distillation_follows_is_not_judged_before_min_curves_distillations_recovered(tmp_path):
    first = _hook(tmp_path, min_curves=2, recovered_by=["distillation"])
    _chain(first, [0.95, 0.80], [0.82, 0.86, 0.88])  # far below the line at the distillation's entry: it runs
    curve = first.trial().user_attrs["curves"][-1]
    assert (curve["kind"], curve["entry"], curve["end"]) == ("distillation", 0.80, 0.88)
    assert first.epochs == 5
    plain = _hook(tmp_path, min_curves=2, recovered_by=[])
    with pytest.raises(TrialStopped, match=r"0\.8000 at the end of node 1: pruning \(after 2 epochs\) below 0\.9000"):
        _chain(plain, [0.95, 0.80])  # recovered_by []: judged as every node end


def test_a_node_end_a_distillation_follows_is_judged_with_the_largest_recovery_distillations_showed(tmp_path):
    for ends, distill in (([0.95, 0.80], [0.82, 0.88]), ([0.95, 0.85], [0.90, 0.93])):  # recovered +0.08, +0.08
        _chain(_hook(tmp_path, min_curves=2, recovered_by=["distillation"]), ends, distill)
    near = _hook(tmp_path, min_curves=2, recovered_by=["distillation"])
    _chain(near, [0.95, 0.83])  # 0.83 + 0.08 reaches the line: its distillation may recover it
    assert near.step == 2
    far = _hook(tmp_path, min_curves=2, recovered_by=["distillation"])
    with pytest.raises(TrialStopped, match=r"0\.8000 at the end of node 1: pruning \(after 2 epochs\): with the "
                                           r"largest recovery a finished distillation node of 6\+ epochs showed "
                                           r"\(\+0\.0800\) still below 0\.9000"):
        _chain(far, [0.95, 0.80])


def test_a_node_end_is_written_beside_its_checkpoint_and_a_trial_started_there_knows_its_entry(tmp_path):
    folders = [tmp_path / "nodes" / "1_pruning", tmp_path / "nodes" / "2_pruning"]
    for folder in folders:
        folder.mkdir(parents=True)
    _chain(_hook(tmp_path, recovered_by=["distillation"]), [0.95, 0.93], checkpoints=folders)
    assert (folders[1] / ENTRY_FILE).is_file()
    later = _hook(tmp_path, recovered_by=["distillation"], start=str(folders[1]))  # continues from pruning#2
    later.before_node(TO_DISTILL, 0, DISTILL)
    later.on_log(TO_DISTILL, 0, DISTILL, {"val_accuracy": 0.96}, 0)
    later.after_node(TO_DISTILL, 0, DISTILL, None, {}, None)
    assert later.trial().user_attrs["curves"][0]["entry"] == 0.93
    shared = _hook(tmp_path, start=str(tmp_path))  # the shared prefix's checkpoint: no judged node end there
    shared.before_node(TO_DISTILL, 0, DISTILL)
    assert shared._entry is None


def test_with_another_quality_the_node_is_judged_on_its_validation_figure_and_its_entry_written_so(tmp_path):
    """``search.quality=recall_top_k`` (a CoLESModule's): the epochs' ``val_recall_top_k`` is judged, not accuracy."""
    folder = tmp_path / "nodes" / "1_pruning"
    folder.mkdir(parents=True)
    hook = _hook(tmp_path, quality="recall_top_k")
    hook.before_node(RUN, 0, PRUNING)
    for step, (recall, acc) in enumerate([(0.95, 0.1), (0.8, 0.99)]):
        hook.on_log(RUN, 0, PRUNING, {"pruning/val_recall_top_k": recall, "pruning/val_accuracy": acc,
                                      "pruning/val_loss": 1.0}, step)
    with pytest.raises(TrialStopped, match=r"validation recall_top_k 0\.8000 at the end of node 0: pruning "
                                           r"\(after 2 epochs\) below 0\.9000"):
        hook.after_node(RUN, 0, PRUNING, None, {}, folder)
    assert json.loads((folder / ENTRY_FILE).read_text()) == {"val_recall_top_k": 0.8, "val_loss": 1.0}
    later = _hook(tmp_path, quality="recall_top_k", start=str(folder))
    later.before_node(RUN, 0, PRUNING)
    assert later._entry == 0.8
