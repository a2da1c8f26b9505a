"""The fidelity replay finds each trial's fidelity twin (by name, or for older studies by the order they were
asked in, skipping the repeats told) and replays stopping rules on the node curves kept there."""
from __future__ import annotations

from types import SimpleNamespace

import optuna

from benchmarks.search.fidelity import _drawn_epochs, fidelity_twins, replay_trial
from fedcore_adapter.search.trial import open_storage

STEPS = ["finetune_1", "finetune_1", "finetune_2", "finetune_2", "finetune_2"]
FINISHED = [[0.95, 0.97, 0.90, 0.94, 0.96], [0.93, 0.96, 0.88, 0.93, 0.97], [0.96, 0.97, 0.91, 0.95, 0.97]]


def _studies(tmp_path, named: bool):
    tmp_path.mkdir()
    storage = open_storage(tmp_path / "study.journal")
    search = optuna.create_study(study_name="search", storage=storage)
    fid = optuna.create_study(study_name="fidelity", storage=storage, direction="maximize")
    for repeat in (False, True, False):  # trial 1 is a repeat told: it asks no fidelity twin
        trial = search.ask()
        trial.set_user_attr("nodes", [{}, {}])
        trial.set_user_attr("start_node", 1)
        if repeat:
            trial.set_user_attr("same_as", 0)
            continue
        twin = fid.ask()
        if named:
            twin.set_user_attr("trial", trial.number)
    return tmp_path


def test_twins_are_found_by_name_or_by_the_order_they_were_asked_in(tmp_path):
    for named in (True, False):
        folder = _studies(tmp_path / str(named), named)
        assert {k: t.number for k, t in fidelity_twins(folder).items()} == {0: 0, 2: 1}


def test_final_phase_replay_stops_a_trial_in_its_last_fine_tune_and_all_in_its_first_dip():
    earlier = [{"key": "pruning:6", "node": 0, "values": v, "phases": STEPS} for v in FINISHED]
    dips = SimpleNamespace(user_attrs={"curves": [{"key": "pruning:6", "node": 0, "phases": STEPS,
                                                   "values": [0.70, 0.72, 0.95, 0.96, 0.97]}]})
    assert replay_trial(dips, earlier, 0.9, "final_phase", 3, last_node=0) is None
    assert replay_trial(dips, earlier, 0.9, "all", 3, last_node=0) == (2, "epoch 2 of node 0")
    assert replay_trial(dips, earlier, 0.9, "off", 3, last_node=1) is None
    doomed = SimpleNamespace(user_attrs={"curves": [{"key": "pruning:6", "node": 0, "phases": STEPS,
                                                     "values": [0.95, 0.97, 0.78, 0.80, 0.82]}]})
    assert replay_trial(doomed, earlier, 0.9, "final_phase", 3, last_node=0) == (4, "epoch 4 of node 0")
    assert replay_trial(doomed, earlier, 0.9, "off", 3, last_node=1) == (5, "end of node 0")


def test_a_node_whose_epochs_the_search_drew_counts_its_own_else_the_table():
    row = {"chain": "pruning#1>distillation+", "param:distillation+.epochs": "12", "param:pruning#1.epochs": ""}
    assert _drawn_epochs(row, "distillation+", 3) == 12
    assert _drawn_epochs(row, "pruning#1", 30) == 30  # not drawn in this trial's chain: the table's figure
    assert _drawn_epochs({}, "distillation+", 3) == 3  # a search whose space held no epochs


def test_a_node_end_a_distillation_follows_is_replayed_as_the_search_judged_it():
    def distilled(entry, end):
        return {"key": "distillation:7", "kind": "distillation", "node": 1, "values": [end], "entry": entry,
                "end": end, "epochs": 6}

    trial = SimpleNamespace(user_attrs={"curves": [{"key": "pruning:31", "node": 0, "values": [0.83]}]})
    following = {0: ("distillation", 6)}
    judged = dict(last_node=1, following=following, recovered_by=("distillation",))
    assert replay_trial(trial, [distilled(0.80, 0.86)], 0.9, "off", 2, **judged) is None  # too few: not judged
    recovered = [distilled(0.80, 0.86), distilled(0.84, 0.88)]  # at most +0.06 from below the line
    assert replay_trial(trial, recovered, 0.9, "off", 2, **judged) == (1, "end of node 0")  # 0.83 + 0.06 < 0.9
    assert replay_trial(trial, recovered, 0.88, "off", 2, **judged) is None  # 0.83 + 0.06 >= 0.88
    plain = dict(last_node=1, following=following)  # a search judging every node end alike (recovered_by [])
    assert replay_trial(trial, recovered, 0.88, "off", 2, **plain) == (1, "end of node 0")
