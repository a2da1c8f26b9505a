"""The search driver on the tiny problem, in this process: real runs, a real Optuna study in the results folder."""
from __future__ import annotations

import csv
import json
from typing import Any

import pytest

from fedcore_adapter import registry
from fedcore_adapter.search.driver import run_search
from tests.search.helpers import config


def _rows(folder):
    with open(folder / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def count_training(monkeypatch):
    """How many times the training node really runs (the registry's apply wrapped)."""
    spec = registry.get_node("training")
    calls = []

    def counted(model, cfg, ctx):
        calls.append(ctx.node_label)
        return spec.apply(model, cfg, ctx)

    monkeypatch.setitem(registry._REGISTRY, "training", registry.NodeSpec("training", spec.config_cls, counted))
    return calls


def test_the_shared_training_prefix_runs_once_and_every_trial_starts_from_its_checkpoint(tmp_path, count_training):
    result = run_search(config(tmp_path, trials=3))
    assert len(count_training) == 1
    rows = _rows(result.folder)
    assert [r["state"] for r in rows] == ["complete"] * 3
    assert all(int(r["start_node"]) >= 1 for r in rows)
    for r in rows:  # a trial's run holds its compression nodes only
        kinds = [row["kind"] for row in json.loads((result.folder / "trials" / f"trial_{int(r['trial']):04d}"
                                                    / "metrics.json").read_text())]
        assert "training" not in kinds and kinds[0] == "input"
    assert (result.folder / "prefix" / "index.json").exists()


def test_constraint_marks_trials_feasible_only_within_the_validation_accuracy_drop(tmp_path):
    result = run_search(config(tmp_path, trials=3, max_accuracy_drop=0.05,
                               space={"pruning": {"pruning_ratio": {"low": 0.2, "high": 0.8}}}))
    ref_val = result.reference["val_accuracy"]
    assert isinstance(ref_val, float)  # the shared prefix's model on the validation split
    rows = _rows(result.folder)
    for r in rows:
        assert r["feasible"] == str(ref_val - float(r["val_accuracy"]) <= 0.05 + 1e-12)
    front = {int(r["trial"]) for r in _rows_csv(result.folder / "pareto.csv")}
    assert front <= {int(r["trial"]) for r in rows if r["feasible"] == "True"}


def _rows_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_constraint_no_trial_meets_ends_with_the_closest_trial_named(tmp_path):
    result = run_search(config(tmp_path, trials=2, max_accuracy_drop=0.0, moves={"drop": False, "reorder": False},
                               space={"pruning": {"pruning_ratio": {"low": 0.9, "high": 0.95},
                                                  "finetune_params": {"epochs": {"low": 0, "high": 0.5}}}}))
    assert not result.feasible and result.best is None
    assert result.message.startswith("no trial met the constraint")
    assert "closest: trial #" in result.message
    assert not _rows_csv(result.folder / "pareto.csv")


def test_another_optimisers_loop_runs_exactly_its_candidates_as_trials(tmp_path, count_training):
    """``loop=``: the candidates given to ``Search.submit`` run as the sampler's would (the shared prefix once, the
    trial rows, trials.csv); one that is not a valid setup fails at once without running."""
    asked = [{"pruning#1.pruning_ratio": 0.3, "pruning#1.importance": "lamp"},
             {"pruning#1.pruning_ratio": 1.5, "pruning#1.importance": "lamp"},  # not a valid setup
             {"pruning#1.pruning_ratio": 0.7, "pruning#1.importance": "magnitude"}]
    seen = {}

    def loop(search, pool):
        assert search.remaining == 3
        for params in asked:
            number = search.submit(pool, params)
            if number not in search.in_flight:
                seen[number] = search.row(number)
            while search.in_flight:
                seen.update(search.collect(pool, timeout=5))
        assert search.remaining == 0

    result = run_search(config(tmp_path, trials=3), loop=loop)
    assert len(count_training) == 1  # the shared prefix, once
    rows = {int(r["trial"]): r for r in _rows(result.folder)}
    assert sorted(rows) == sorted(seen) == [0, 1, 2]
    for number, params in enumerate(asked):
        assert seen[number]["trial"] == number
        assert {k: rows[number][f"param:{k}"] for k in params} == {k: str(v) for k, v in params.items()}
    assert [rows[n]["state"] for n in range(3)] == ["complete", "failed", "complete"]
    assert "pruning_ratio" in rows[1]["error"] and not rows[1]["output_dir"]
    ran = [result.study.trials[n].user_attrs["nodes"][1] for n in (0, 2)]  # the chains the trials ran
    assert [(n["pruning_ratio"], n["importance"]) for n in ran] == [(0.3, "lamp"), (0.7, "magnitude")]


def test_after_the_start_up_trials_trials_continue_a_feasible_front_trials_computed_prefix(tmp_path, monkeypatch):
    """``search.reuse``: a continuation fixes a front trial's chain and every node but the last, starts from that
    trial's cached checkpoint (the node is not run again: counted) and draws only the last node's fields."""
    spec, runs = registry.get_node("pruning"), []

    def counted(model, cfg, ctx):
        runs.append(ctx.node_label)
        return spec.apply(model, cfg, ctx)

    monkeypatch.setitem(registry._REGISTRY, "pruning", registry.NodeSpec("pruning", spec.config_cls, counted))
    rows = _two_pruning_nodes_searched(tmp_path, trials=8, reuse=1.0)
    assert [r["state"] for r in rows] == ["complete"] * 8
    by_number = {int(r["trial"]): r for r in rows}
    assert all(not r["continues"] for n, r in by_number.items() if n < 4)  # the start-up trials: drawn whole
    continued = [r for n, r in by_number.items() if n >= 4]
    assert continued and all(r["continues"] for r in continued)  # reuse=1.0, every trial feasible: all continue
    for r in continued:
        parent = by_number[int(r["continues"])]
        assert parent["feasible"] == "True" and int(parent["trial"]) < int(r["trial"])
        assert r["param:pruning#1.pruning_ratio"] == parent["param:pruning#1.pruning_ratio"]
        assert r["start_node"] == "2"  # past the training prefix and the parent's first pruning node
    assert len(runs) == sum(3 - int(r["start_node"]) for r in rows)  # a node is run from where its trial starts


def test_reuse_after_lets_continuations_start_before_the_start_up_trials_end(tmp_path):
    rows = _two_pruning_nodes_searched(tmp_path, trials=8, reuse=1.0, reuse_after=2)
    by_number = {int(r["trial"]): r for r in rows}
    assert all(not r["continues"] for n, r in by_number.items() if n < 2)
    assert all(r["continues"] for n, r in by_number.items() if n >= 2)  # the front has feasible trials by then


def test_reuse_per_prefix_caps_the_continuations_started_from_one_prefix(tmp_path):
    rows = _two_pruning_nodes_searched(tmp_path, trials=10, reuse=1.0, reuse_after=2, reuse_per_prefix=1)
    continued = [r for r in rows if r["continues"]]
    prefixes = [r["param:pruning#1.pruning_ratio"] for r in continued]  # one chain: the first ratio is the prefix
    assert continued and len(set(prefixes)) == len(prefixes)  # each prefix continued once at most
    assert any(not r["continues"] for r in rows if int(r["trial"]) >= 2)  # then the sampler draws whole trials


def test_start_with_setup_runs_the_setups_own_chain_as_it_defines_it_first(tmp_path):
    """The initial assumption as the first candidate: the setup's pruning ratio (0.5), the rest of its fields
    as its node config defines them; the trials after it are drawn."""
    from fedcore_adapter.nodes.pruning.config import PruningConfig

    result = run_search(config(tmp_path, trials=3, start_with_setup=True, space={"pruning": {"reconstruct": False}}))
    first = result.study.trials[0]
    assert first.user_attrs.get("initial") is True and first.state.name == "COMPLETE"
    node = first.user_attrs["nodes"][1]
    assert node["kind"] == "pruning" and node["pruning_ratio"] == 0.5
    assert node["importance"] == PruningConfig.model_fields["importance"].default
    assert not any(t.user_attrs.get("initial") for t in result.study.trials[1:])


def test_start_with_setup_outside_a_narrowed_space_draws_the_first_trial_and_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="fedcore_adapter.search"):
        result = run_search(config(tmp_path, trials=1, start_with_setup=True,
                                   space={"pruning": {"pruning_ratio": {"low": 0.6, "high": 0.9}}}))
    assert "the setup's own chain has a value outside the search space" in caplog.text
    assert not result.study.trials[0].user_attrs.get("initial")
    assert result.study.trials[0].user_attrs["nodes"][-1]["pruning_ratio"] >= 0.6


def test_reuse_zero_draws_every_trial_whole(tmp_path):
    rows = _two_pruning_nodes_searched(tmp_path, trials=6, reuse=0.0)
    assert [r["continues"] for r in rows] == [""] * 6


def _two_pruning_nodes_searched(tmp_path, trials: int, reuse: float, **search: Any) -> list[dict]:
    """The rows of the trials run (not the repeats) of a search over training -> pruning -> pruning, every trial
    feasible, only the pruning ratios searched."""
    from tests.search.helpers import SETUP

    prune = {"kind": "pruning", "pruning_ratio": 0.3, "finetune_params": {"epochs": 1, "learning_rate": 0.01}}
    cfg = config(tmp_path, trials=trials, reuse=reuse, max_accuracy_drop=1.0, **search,
                 moves={"drop": False, "insert": [], "reorder": False},
                 space={"pruning": {"importance": False, "reconstruct": False}})
    cfg["setup"] = {**SETUP, "nodes": [SETUP["nodes"][0], prune, dict(prune)]}
    return [r for r in _rows(run_search(cfg).folder) if not r["same_as"]]


def test_chains_ending_in_distillation_are_continued_and_learn_from_the_shared_prefix_as_their_whole_chain(
        tmp_path):
    """A continued trial of training -> pruning -> distillation starts past its parent's pruning node; its
    distillation learns from the shared prefix (``teacher_checkpoint``) there as in its whole chain, which the
    exported setup file runs again with the same figures."""
    import yaml

    from fedcore_adapter.building import run_from_config
    from tests.search.helpers import DATA, MODEL, SETUP

    prune = {"kind": "pruning", "pruning_ratio": 0.3, "finetune_params": {"epochs": 1, "learning_rate": 0.01}}
    distill = {"kind": "distillation", "epochs": 1, "learning_rate": 0.01, "temperature": 2.0}
    cfg = config(tmp_path, trials=6, reuse=1.0, max_accuracy_drop=1.0,
                 moves={"drop": False, "insert": [], "reorder": False},
                 space={"pruning": {"importance": False, "reconstruct": False}})
    cfg["setup"] = {**SETUP, "nodes": [SETUP["nodes"][0], prune, distill]}
    result = run_search(cfg)
    rows = [r for r in _rows(result.folder) if not r["same_as"]]
    continued = [r for r in rows if r["continues"]]
    assert continued and all(r["start_node"] == "2" and r["state"] == "complete" for r in continued)
    shared = str((result.folder / "prefix").absolute())
    for r in continued:
        node = result.study.trials[int(r["trial"])].user_attrs["nodes"][-1]
        assert node["kind"] == "distillation" and node["teacher_checkpoint"].startswith(shared)
    row = next(r for r in result.front if r["trial"] in {int(c["trial"]) for c in continued})
    path = result.folder / "pareto" / f"trial_{row['trial']:04d}.yaml"
    again = run_from_config({"setup": str(path), "model": MODEL, "data": DATA, "tracking": {"name": "none"},
                             "output_dir": str(tmp_path / "again")})
    assert yaml.safe_load(path.read_text())["nodes"][0]["kind"] == "training"  # the whole chain, from the input
    last = again.metrics[-1]
    assert (last["params"], last["accuracy"]) == (row["params"], row["accuracy"])


def test_a_node_keeps_the_structure_with_the_same_params_and_macs_and_bytes_within_a_tenth_of_a_percent():
    from fedcore_adapter.search.driver import kept_structure

    rows = [{"params": 10, "macs": 100, "size_mb": 1.0},
            {"params": 10, "macs": 100, "size_mb": 1.0005},  # a distillation: the same tensors, re-serialised
            {"params": 8, "macs": 100, "size_mb": 0.8},  # fewer parameters
            {"params": 8, "macs": 90, "size_mb": 0.8},  # fewer MACs
            {"params": 8, "macs": 90, "size_mb": 0.7},  # smaller on disk (int8)
            {"params": 8, "macs": 90, "size_mb": None}]  # not measured: not known to keep it
    assert kept_structure(rows) == [True, False, False, False, False]
    assert kept_structure(rows[:1]) == []


def test_structural_redraw_continues_a_chain_ending_in_distillation_from_before_its_last_pruning(tmp_path):
    """``search.reuse_redraw: structural``: the distillation is measured leaving the structure as the pruning before
    it left it, so a continuation of training -> pruning -> pruning -> distillation re-draws the second pruning too
    (it moves along the cost objectives); with ``last`` it re-draws the distillation alone."""
    from tests.search.helpers import SETUP

    prune = {"kind": "pruning", "pruning_ratio": 0.3, "finetune_params": {"epochs": 1, "learning_rate": 0.01}}
    distill = {"kind": "distillation", "epochs": 1, "learning_rate": 0.01, "temperature": 2.0}
    found = {}
    for redraw in ("last", "structural"):
        cfg = config(tmp_path / redraw, trials=8, reuse=1.0, reuse_after=2, max_accuracy_drop=1.0,
                     reuse_redraw=redraw, moves={"drop": False, "insert": [], "reorder": False},
                     space={"pruning": {"importance": False, "reconstruct": False},
                            "distillation": {"epochs": {"low": 1, "high": 2}}})
        cfg["setup"] = {**SETUP, "nodes": [SETUP["nodes"][0], prune, dict(prune), distill]}
        result = run_search(cfg)
        rows = [r for r in _rows(result.folder) if not r["same_as"]]
        for r in rows:  # measured: the distillation kept the structure the pruning nodes changed
            kept = result.study.trials[int(r["trial"])].user_attrs["kept_structure"]
            assert kept[-1] is True and len(kept) == 4 - int(r["start_node"])
            assert not any(kept[:-1]) or r["param:pruning#2.pruning_ratio"] == "0.0"
        continued = [r for r in rows if r["continues"]]
        assert continued
        found[redraw] = (continued, {r["trial"]: r for r in rows})
    assert {r["start_node"] for r in found["last"][0]} == {"3"}
    continued, parents = found["structural"]
    assert "2" in {r["start_node"] for r in continued}  # past the training and the first pruning only
    assert {r["start_node"] for r in continued} <= {"2", "3"}  # 3: a second pruning drawn as an earlier one ran
    assert all(r["param:pruning#1.pruning_ratio"] == parents[r["continues"]]["param:pruning#1.pruning_ratio"]
               for r in continued)
    assert any(r["param:pruning#2.pruning_ratio"] != parents[r["continues"]]["param:pruning#2.pruning_ratio"]
               for r in continued)  # the second pruning's ratio is drawn again


def test_a_candidate_asked_again_is_told_the_earlier_trials_figures_not_run_and_not_counted(tmp_path, count_training):
    """The runs are deterministic: a repeat of a finished candidate costs nothing, is marked ``same_as`` and leaves
    the search to ask another, so ``search.trials`` are distinct candidates; the front holds the trial once."""
    asked = [{"pruning#1.pruning_ratio": 0.3, "pruning#1.importance": "lamp"},
             {"pruning#1.pruning_ratio": 0.3, "pruning#1.importance": "lamp"},  # the same candidate again
             {"pruning#1.pruning_ratio": 0.7, "pruning#1.importance": "magnitude"}]

    def loop(search, pool):
        remaining = []
        for params in asked:
            search.submit(pool, params)
            while search.in_flight:
                search.collect(pool, timeout=5)
            remaining.append(search.remaining)
        assert remaining == [1, 1, 0]  # the repeat did not use up a trial

    result = run_search(config(tmp_path, trials=2, space={"pruning": {"reconstruct": False}}), loop=loop)
    rows = {int(r["trial"]): r for r in _rows(result.folder)}
    assert rows[1]["same_as"] == "0" and rows[1]["epochs"] == "0"
    assert not (result.folder / "trials" / "trial_0001").exists()  # not run
    assert {k: rows[1][k] for k in ("macs", "params", "val_accuracy", "feasible", "output_dir")} == \
        {k: rows[0][k] for k in ("macs", "params", "val_accuracy", "feasible", "output_dir")}
    assert result.study.trials[1].values == result.study.trials[0].values
    assert 1 not in {r["trial"] for r in result.front}


def test_a_sampler_that_repeats_itself_eight_times_per_trial_wanted_is_stuck_and_its_repeat_runs(tmp_path):
    """Repeats are told, not run, up to ``REPEATS_PER_TRIAL`` per trial wanted (continuations re-draw one node on
    its grid, so they repeat often); past that the sampler is stuck and what it asks runs and counts."""
    from fedcore_adapter.search.driver import REPEATS_PER_TRIAL

    same = {"pruning#1.pruning_ratio": 0.3, "pruning#1.importance": "lamp"}
    told = REPEATS_PER_TRIAL * 2

    def loop(search, pool):
        for _ in range(told + 2):
            search.submit(pool, same)
            while search.in_flight:
                search.collect(pool, timeout=5)

    rows = _rows(run_search(config(tmp_path, trials=2, space={"pruning": {"reconstruct": False}}), loop=loop).folder)
    assert [bool(r["same_as"]) for r in rows] == [False] + [True] * told + [False]


class _LosesOnce:
    """The sequential pool, but the run ``lose`` (a trial number, or "prefix") is reported lost with its worker
    the first time it finishes (as the Dask pool reports it)."""

    def __init__(self, pool, lose):
        self.pool, self.slots, self.lose, self.lost = pool, pool.slots, lose, False

    def submit(self, key, payload):
        self.pool.submit(key, payload)

    def finished(self, timeout=None):
        out = self.pool.finished(timeout)
        for i, (key, outcome) in enumerate(out):
            if key == self.lose and not self.lost:
                self.lost = True
                out[i] = (key, {**outcome, "status": "failed", "lost": True, "error": "worker lost"})
        return out

    def close(self):
        self.pool.close()


@pytest.mark.parametrize("twin_lost", [False, True], ids=["twin finishes", "twin lost"])
def test_a_candidate_asked_while_its_twin_runs_is_not_run_twice_but_told_when_the_twin_ends(tmp_path, twin_lost):
    """Two workers: a candidate may be asked again before its twin finishes. It is not started; it waits for the
    twin and is told its figures (``same_as``, not counted), or, if the twin's worker is lost (the twin is asked
    again), it is failed without figures and the re-run counts once."""
    from fedcore_adapter.search import driver

    same = {"pruning#1.pruning_ratio": 0.3, "pruning#1.importance": "lamp"}
    seen = []

    def loop(search, pool):
        first = search.submit(pool, same)
        second = search.submit(pool, same)  # the first is still in flight
        assert list(search.in_flight) == [first] and second not in search.in_flight
        assert not (search.folder / "trials" / f"trial_{second:04d}").exists()
        while search.in_flight or search.remaining:
            while not search.in_flight and search.remaining:
                search.submit(pool)  # the lost twin's re-run, asked again by the search
            seen.extend(search.collect(pool, timeout=5))

    real = driver.SequentialPool
    factory = (lambda fn: _LosesOnce(real(fn), 0)) if twin_lost else real
    with pytest.MonkeyPatch.context() as m:
        m.setattr(driver, "SequentialPool", factory)
        result = run_search(config(tmp_path, trials=1, space={"pruning": {"reconstruct": False}}), loop=loop)
    assert [n for n, _ in seen][:2] == [0, 1]  # the twin's row is returned by the collect that told its twin
    study = result.study
    if not twin_lost:
        assert study.trials[1].user_attrs["same_as"] == 0 and study.trials[1].values == study.trials[0].values
        assert study.trials[1].user_attrs["epochs"] == 0
        assert len(study.trials) == 2
    else:
        assert study.trials[0].user_attrs["lost"] and study.trials[1].state.name == "FAIL"
        assert study.trials[1].user_attrs["same_as"] == 0 and "metrics" not in study.trials[1].user_attrs
        assert study.trials[2].user_attrs["rerun_of"] == 0 and study.trials[2].state.name == "COMPLETE"
    rows = [r for r in _rows(result.folder) if not r["same_as"]]
    assert len(rows) == 1 and rows[0]["state"] == "complete"
    assert sorted(p.name for p in (result.folder / "trials").iterdir() if p.name.startswith("trial_")) == \
        (["trial_0000", "trial_0002"] if twin_lost else ["trial_0000"])


def test_a_shared_prefix_whose_worker_was_lost_is_run_again(tmp_path, count_training):
    """The prefix runs on the pool like a trial: a lost worker there re-runs it (``search.retries``), not the
    search's end; it is still computed once when it finishes."""
    from fedcore_adapter.search import driver

    real = driver.SequentialPool
    with pytest.MonkeyPatch.context() as m:
        m.setattr(driver, "SequentialPool", lambda fn: _LosesOnce(real(fn), "prefix"))
        result = run_search(config(tmp_path, trials=1, space={"pruning": {"reconstruct": False}}))
    assert len(count_training) == 2  # the lost run and its re-run; the trial started from the re-run's checkpoint
    assert [r["state"] for r in _rows(result.folder)] == ["complete"]


def test_contribution_weights_each_front_trial_by_what_the_front_loses_without_it():
    """``search.reuse_parent=contribution``: a front trial is continued in proportion to its exclusive share of
    the hypervolume, against the uncompressed model's MACs and the constraint line (validation 0.9575 - 1 pt)."""
    from types import SimpleNamespace

    from fedcore_adapter.search.config import SearchConfig
    from fedcore_adapter.search.driver import Search

    search = Search.__new__(Search)
    search.scfg = SearchConfig.parse({"objectives": ["macs", "accuracy"], "max_accuracy_drop": 0.01,
                                      "reuse_parent": "contribution"})
    search.state = {"reference": {"row": {"macs": 1000.0}, "val_accuracy": 0.9575}}
    front = [SimpleNamespace(values=v) for v in ([100, 0.96], [50, 0.955], [10, 0.95])]
    # (100, 0.96) alone covers MACs 100..1000 between 0.955 and 0.96; (50, 0.955) MACs 50..100 between 0.95 and
    # 0.955; (10, 0.95) MACs 10..50 between the line and 0.95
    assert search._contributions(front) == pytest.approx([900 * 0.005, 50 * 0.005, 40 * 0.0025])
    on_the_line = [SimpleNamespace(values=[5, 0.9475])] + front
    assert search._contributions(on_the_line)[0] == 0.0  # at the line it adds nothing: never continued


LOW_RANK = {"name": "TINY_LR", "common": {"latency_repeats": 2, "latency_warmup": 1},
            "nodes": [{"kind": "training", "epochs": 8, "learning_rate": 0.01},
                      {"kind": "low_rank", "method": {"name": "svd", "epochs": 2, "thresholds": [0.9]},
                       "finetune_params": {"epochs": 1, "learning_rate": 0.01}}]}


def _thresholds_searched(tmp_path, share_training: bool) -> list[dict]:
    """Two candidates whose low-rank node differs only in its threshold, one after the other; each trial's
    row and its low-rank node's metrics row."""
    cfg = config(tmp_path / str(share_training), trials=2, share_training=share_training,
                 early_stop={"enabled": True, "margin": 1.0})
    cfg["setup"] = LOW_RANK

    def loop(search, pool):
        for threshold in (0.6, 0.95):
            search.submit(pool, {"low_rank#1.method.thresholds": threshold})
            while search.in_flight:
                search.collect(pool, timeout=5)

    result = run_search(cfg, loop=loop)
    rows = sorted(_rows(result.folder), key=lambda r: int(r["trial"]))
    nodes = [json.loads((result.folder / "trials" / f"trial_{int(r['trial']):04d}" / "metrics.json").read_text())[-1]
             for r in rows]
    return [{**r, "node": node} for r, node in zip(rows, nodes)]


def test_a_trials_training_equal_to_an_earlier_trials_is_restored_with_the_same_result(tmp_path):
    """The low-rank node's U,S,Vh training does not depend on its threshold: the second trial restores it from
    the first (2 of its 3 epochs not run, its row says so) and ends exactly where running it gives."""
    shared = _thresholds_searched(tmp_path, share_training=True)
    alone = _thresholds_searched(tmp_path, share_training=False)
    assert [r["state"] for r in shared + alone] == ["complete"] * 4
    assert [int(r["epochs"]) for r in shared] == [3, 1] and [int(r["epochs"]) for r in alone] == [3, 3]
    assert [int(r["epochs_reused"]) for r in shared] == [0, 2] and [int(r["epochs_reused"]) for r in alone] == [0, 0]
    assert "low_rank_train: 2 epochs reused from an identical earlier training" in shared[1]["node"]["note"]
    assert "note" not in alone[1]["node"] or "reused" not in alone[1]["node"]["note"]
    for a, b in zip(shared, alone):
        assert a["params"] == b["params"] and a["val_accuracy"] == b["val_accuracy"]
        assert a["node"]["loss"] == b["node"]["loss"]
    assert shared[0]["params"] != shared[1]["params"]  # the thresholds gave different models
    assert list((tmp_path / "True" / "out").glob("SEARCH_*/prefix/training/*.pt"))
    assert not list((tmp_path / "False" / "out").glob("SEARCH_*/prefix/training/*.pt"))


def test_a_continuation_restores_the_training_its_parent_ran_before_the_node_it_redraws(tmp_path):
    """Trial 1 is trial 0 with another low-rank threshold: it starts from trial 0's pruning checkpoint, and the
    low-rank node's U,S,Vh training (which trial 0 ran after its pruning, in one run) is restored: each trial
    seeds its nodes, and validates, as its whole chain does, and its teacher is the search's input model."""
    cfg = config(tmp_path, trials=2, early_stop={"enabled": True, "margin": 1.0})
    cfg["setup"] = {**LOW_RANK, "nodes": [LOW_RANK["nodes"][0],
                                          {"kind": "pruning", "pruning_ratio": 0.5,
                                           "finetune_params": {"epochs": 1, "learning_rate": 0.01}},
                                          LOW_RANK["nodes"][1]]}

    def loop(search, pool):
        for threshold in (0.6, 0.95):
            search.submit(pool, {"chain": "pruning#1>low_rank#2", "pruning#1.pruning_ratio": 0.5,
                                 "pruning#1.importance": "magnitude", "pruning#1.reconstruct": False,
                                 "low_rank#2.method.thresholds": threshold})
            while search.in_flight:
                search.collect(pool, timeout=5)

    rows = sorted(_rows(run_search(cfg, loop=loop).folder), key=lambda r: int(r["trial"]))
    assert [r["state"] for r in rows] == ["complete"] * 2
    assert [int(r["start_node"]) for r in rows] == [1, 2]  # trial 1 from trial 0's pruning checkpoint
    assert [int(r["epochs"]) for r in rows] == [4, 1] and [int(r["epochs_reused"]) for r in rows] == [0, 2]


def _recovering(tmp_path, trials: int) -> dict:
    """Training -> pruning -> pruning, distillation insertable, every continuation a recovery while one may be,
    every trial below the line a near miss (``recover_within`` 1.0)."""
    from tests.search.helpers import SETUP

    prune = {"kind": "pruning", "pruning_ratio": 0.3, "finetune_params": {"epochs": 1, "learning_rate": 0.01}}
    cfg = config(tmp_path, trials=trials, reuse=1.0, reuse_after=1, reuse_recover=1.0, recover_within=1.0,
                 max_accuracy_drop=0.0, moves={"drop": True, "insert": ["distillation"], "reorder": False},
                 insert_templates={"distillation": {"epochs": {"low": 1, "high": 2}, "learning_rate": 0.01}},
                 space={"pruning": {"importance": False, "reconstruct": False}})
    cfg["setup"] = {**SETUP, "nodes": [SETUP["nodes"][0], prune, dict(prune)]}
    return cfg


def test_a_recovery_continuation_keeps_every_node_of_a_near_miss_and_appends_a_distillation(tmp_path):
    """``search.reuse_recover``: a trial whose last node changed the structure and that ended on the front or at
    most ``recover_within`` below the line is continued once with a distillation after it, started from its final
    checkpoint: drawn as the space's chain where the longer chain is one of them, else appended to its chain
    (beyond the moves' depth)."""
    cfg = _recovering(tmp_path, trials=6)
    asked = [{"chain": "pruning#1>pruning#2", "pruning#1.pruning_ratio": 0.5, "pruning#2.pruning_ratio": 0.5},
             {"chain": "pruning#1", "pruning#1.pruning_ratio": 0.6}]
    got = []

    def loop(search, pool):
        for params in asked:
            search.submit(pool, params)
            while search.in_flight:
                search.collect(pool, timeout=5)
        while search.remaining:
            offered = {t.number for t, _, _ in search._recoverable()}
            params, attrs = search.continuation()
            got.append((offered, attrs))
            search.submit(pool, params, attrs)
            while search.in_flight:
                search.collect(pool, timeout=5)

    result = run_search(cfg, loop=loop)
    trials = result.study.trials
    for offered, _ in got:  # trials that ended on a pruning, none dominated by another offered
        assert offered <= {0, 1, 4, 5} and not any(trials[n].user_attrs["kept_structure"][-1] for n in offered)
        values = [trials[n].values for n in offered]
        assert not any(a[0] <= b[0] and a[1] >= b[1] and a != b for a in values for b in values)
    parents = [attrs["recovers"] for _, attrs in got if "recovers" in attrs]
    assert {0, 1} <= set(parents) and len(set(parents)) == len(parents)  # each once
    recoveries = {attrs["recovers"]: n for n, (_, attrs) in enumerate(got, start=2) if "recovers" in attrs}
    for parent, number in recoveries.items():
        t, p = trials[number], trials[parent]
        nodes = t.user_attrs["nodes"]
        assert nodes[:-1] == p.user_attrs["nodes"] and nodes[-1]["kind"] == "distillation"
        assert t.user_attrs["start_node"] == len(p.user_attrs["nodes"])  # from the parent's final checkpoint
        assert t.user_attrs["kept_structure"] == [True] and t.state.name == "COMPLETE"
        assert t.values[0] == p.values[0]  # the same parameters: a recovery keeps the structure
    assert trials[recoveries[0]].params["chain"] == "pruning#1>pruning#2>distillation+"  # one of the space's
    assert trials[recoveries[1]].params["chain"] == "pruning#1"  # beyond depth 1: appended
    assert trials[recoveries[1]].user_attrs["append"] == ["distillation+"]
    assert trials[recoveries[1]].user_attrs["chain"] == "pruning#1>distillation+"
    rows = {int(r["trial"]): r for r in _rows(result.folder)}
    assert rows[recoveries[1]]["chain"] == "pruning#1>distillation+" and rows[recoveries[1]]["continues"] == "1"


def test_a_recovery_whose_worker_was_lost_is_asked_again_with_its_distillation_appended(tmp_path):
    """A lost trial is asked again with the same parameters: a recovery's appended distillation (not a parameter
    but what the continuation appended) comes with it, and whom it recovers."""
    from fedcore_adapter.search import driver

    cfg = _recovering(tmp_path, trials=2)

    def loop(search, pool):
        search.submit(pool, {"chain": "pruning#1", "pruning#1.pruning_ratio": 0.6})
        search.collect(pool, timeout=5)
        search.submit(pool, *search.continuation())  # lost
        while search.in_flight or search.remaining:
            while not search.in_flight and search.remaining:
                search.submit(pool)  # the lost recovery, asked again by the search
            search.collect(pool, timeout=5)

    real = driver.SequentialPool
    with pytest.MonkeyPatch.context() as m:
        m.setattr(driver, "SequentialPool", lambda fn: _LosesOnce(real(fn), 1))
        result = run_search(cfg, loop=loop)
    lost, again = result.study.trials[1], result.study.trials[2]
    assert lost.user_attrs["lost"] and lost.user_attrs["append"] == ["distillation+"]
    assert again.user_attrs["rerun_of"] == 1 and again.state.name == "COMPLETE"
    assert {k: again.user_attrs[k] for k in ("append", "recovers", "chain")} == \
        {"append": ["distillation+"], "recovers": 0, "chain": "pruning#1>distillation+"}
    assert again.params == lost.params and again.user_attrs["nodes"] == lost.user_attrs["nodes"]
