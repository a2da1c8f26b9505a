"""The search space: what each node kind declares searchable, the chain moves, and the user's narrowing."""
from __future__ import annotations

import pytest

from fedcore_adapter.errors import ConfigError
from fedcore_adapter.registry import get_node
from fedcore_adapter.search.config import SearchConfig
from fedcore_adapter.search.space import derive_space
from fedcore_adapter.building import resolve_setup as load_setup


def _space(nodes, **search):
    setup = load_setup({"name": "S", "nodes": [{"kind": "training", "epochs": 1}, *nodes]})
    return derive_space(setup, SearchConfig.parse({"moves": {"insert": [], "drop": False, "reorder": False},
                                                   **search}))


def _dims(space):
    return {d.name: d for d in space.dimensions()}


@pytest.mark.parametrize("node, expected", [
    ({"kind": "pruning"}, {"pruning#1.pruning_ratio": ("float", 0.1, 0.9),
                           "pruning#1.importance": ("categorical", ("magnitude", "lamp", "taylor")),
                           "pruning#1.reconstruct": ("categorical", (False, True))}),
    ({"kind": "low_rank"}, {"low_rank#1.method.thresholds": ("float", 0.5, 0.99)}),  # one energy threshold, [t]
    ({"kind": "low_rank", "method": {"name": "falor", "allocation": "global", "budget": {"ratio": 0.5}}},
     {"low_rank#1.method.budget.ratio": ("float", 0.2, 0.95)}),  # falor's params budget
    ({"kind": "low_rank", "method": {"name": "falor", "allocation": "global", "budget": {"value": 1000}}},
     {}),  # a budget given as a count: its ratio (the other way to give it) is not searched
    ({"kind": "low_rank", "method": {"name": "falor", "metric": {"name": "cosine", "threshold": 0.02}}},
     {"low_rank#1.method.metric.threshold": ("float", 0.001, 0.1)}),  # falor's per-layer bound
    ({"kind": "low_rank", "method": {"name": "svd", "budget": {"metric": "macs", "ratio": 0.5}}},
     {"low_rank#1.method.thresholds": ("float", 0.5, 0.99), "low_rank#1.method.budget.ratio": ("float", 0.2, 0.95)}),
    ({"kind": "unstructured_pruning"}, {"unstructured_pruning#1.sparsity": ("float", 0.1, 0.95)}),
    ({"kind": "ptq_static"}, {"ptq_static#1.observer": ("categorical", ("minmax", "histogram", "percentile"))}),
    ({"kind": "ptq_dynamic"}, {"ptq_dynamic#1.allow_conv": ("categorical", (False, True))}),
    ({"kind": "qat"}, {"qat#1.learnable_scales": ("categorical", (False, True))}),
    ({"kind": "distillation"}, {"distillation#1.temperature": ("float", 1.0, 8.0)}),
    ({"kind": "training"}, {}),  # declared (epochs, learning_rate) but searched only when named in search.space
])
def test_each_node_kind_declares_its_searchable_fields_and_ranges(node, expected):
    dims = _dims(_space([node], prefix=1))
    got = {name: (d.type, d.choices) if d.type == "categorical" else (d.type, d.low, d.high)
           for name, d in dims.items()}
    assert got == expected


def test_the_leading_training_node_is_the_shared_prefix_and_is_not_searched():
    space = _space([{"kind": "pruning"}])
    assert [n["kind"] for n in space.prefix] == ["training"]
    assert all(not d.name.startswith("training") for d in space.dimensions())


def test_the_user_narrows_widens_and_removes_fields_in_yaml():
    space = _space([{"kind": "pruning", "finetune_params": {"epochs": 2}}], space={
        "pruning": {"pruning_ratio": {"low": 0.5, "high": 0.8}, "importance": False,
                    "finetune_params": {"epochs": {"low": 1, "high": 6}}},
        "1": {"global_pruning": {"choices": [False, True]}}})
    dims = _dims(space)
    assert (dims["pruning#1.pruning_ratio"].low, dims["pruning#1.pruning_ratio"].high) == (0.5, 0.8)
    assert "pruning#1.importance" not in dims
    assert (dims["pruning#1.finetune_params.epochs"].type, dims["pruning#1.finetune_params.epochs"].high) == ("int", 6)
    assert dims["pruning#1.global_pruning"].choices == (False, True)


def test_chain_moves_drop_insert_and_reorder_where_the_chain_rules_allow():
    setup = load_setup("composite_1")
    space = derive_space(setup, SearchConfig.parse({"moves": {"insert": ["ptq_static"], "drop": True,
                                                              "reorder": True}}))
    chains = list(space.chains)
    assert chains[0] == "pruning#1>low_rank#2>pruning#3"  # the initial assumption first
    assert {"low_rank#2>pruning#3", "pruning#1>pruning#3", "pruning#1>low_rank#2"} <= set(chains)  # drops
    assert {"low_rank#2>pruning#1>pruning#3", "pruning#1>pruning#3>low_rank#2"} <= set(chains)  # swaps
    inserted = [c for c in chains if "ptq_static+" in c]
    assert inserted == ["pruning#1>low_rank#2>pruning#3>ptq_static+"]  # int8 only at the end of the chain


def test_neighbours_are_the_space_chains_one_move_away_either_way():
    space = derive_space(load_setup("composite_1"), SearchConfig.parse({"moves": {"insert": ["ptq_static"]}}))
    initial = space.initial
    assert set(space.neighbours(initial)) == set(space.chains) - {initial}  # depth 1: every chain is one move away
    # a dropped node comes back (the move undone), the other drop is two moves away (not a neighbour)
    assert set(space.neighbours("pruning#1>pruning#3")) == {initial, "low_rank#2>pruning#1>pruning#3",
                                                            "pruning#1>pruning#3>low_rank#2"}
    assert space.neighbours("pruning#1>low_rank#2>pruning#3>ptq_static+") == [initial]  # int8 stays last
    fixed = derive_space(load_setup("composite_1"), SearchConfig.parse({"moves": {"insert": [], "drop": False,
                                                                                  "reorder": False}}))
    assert fixed.neighbours(fixed.initial) == []


def test_defined_values_are_the_setups_own_named_and_shaped_as_suggested():
    space = derive_space(load_setup("composite_1"), SearchConfig.parse({"moves": {"insert": ["ptq_static"]}}))
    assert space.defined("pruning#1") == {"pruning#1.pruning_ratio": 0.75, "pruning#1.importance": "magnitude",
                                          "pruning#1.reconstruct": False}
    assert space.defined("low_rank#2") == {"low_rank#2.method.thresholds": 0.9}  # [0.9] in the setup: one value
    observer = space.defined("ptq_static+")["ptq_static+.observer"]  # not set: the node config's default
    assert observer == get_node("ptq_static").config_cls().observer


def test_every_candidate_chain_is_a_valid_setup_and_suggests_one():
    import optuna

    setup = load_setup("composite_1")
    space = derive_space(setup, SearchConfig.parse({"moves": {"insert": ["ptq_static", "distillation"]}}))
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        label, nodes = space.suggest(study.ask())
        assert [n["kind"] for n in nodes][1:] == [t.split("#")[0].rstrip("+") for t in label.split(">")]
        for node in nodes:
            if node["kind"] == "low_rank":
                assert node["method"]["name"] == "svd" and len(node["method"]["thresholds"]) == 1
        load_setup({"name": "x", "nodes": nodes})


def test_a_recovery_appends_an_inserted_recovery_node_beyond_the_chains_where_the_chain_rules_allow():
    """A recovery continuation's distillation: the insert templates of the kinds that recover accuracy, appended
    after a drawn chain (its fields drawn too), but never after int8 (which stays last)."""
    import optuna

    space = derive_space(load_setup("composite_1"), SearchConfig.parse({"moves": {"insert": ["ptq_static",
                                                                                          "distillation"]}}))
    assert space.recovery_templates(["distillation"]) == ["distillation+"]
    assert space.recovery_templates(["training"]) == []  # not insertable here: nothing to append
    assert "pruning#1>pruning#3>distillation+" not in space.chains  # two moves from the setup
    assert space.allows(("pruning#1", "pruning#3", "distillation+"))
    assert not space.allows(("pruning#1", "low_rank#2", "pruning#3", "ptq_static+", "distillation+"))
    study = optuna.create_study(directions=["minimize", "maximize"])
    study.enqueue_trial({"chain": "pruning#1>pruning#3"})
    trial = study.ask()
    label, nodes = space.suggest(trial, ("distillation+",))
    assert label == "pruning#1>pruning#3>distillation+"
    assert [n["kind"] for n in nodes] == ["training", "pruning", "pruning", "distillation"]
    assert {"distillation+.epochs", "distillation+.temperature"} <= set(trial.params)


def test_a_falor_budget_candidate_is_a_valid_low_rank_node_with_the_budget_searched():
    import optuna

    space = _space([{"kind": "low_rank", "method": {"name": "falor", "allocation": "global",
                                                    "budget": {"metric": "params", "ratio": 0.5}}}], prefix=1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ratios = set()
    for _ in range(5):
        _, nodes = space.suggest(study.ask())
        method = nodes[1]["method"]
        assert method["name"] == "falor" and method["allocation"] == "global"
        assert set(method["budget"]) >= {"ratio"} and method["budget"].get("value") is None
        ratios.add(method["budget"]["ratio"])
        load_setup({"name": "x", "nodes": nodes})
    assert len(ratios) >= 3 and all(0.2 <= r <= 0.95 and round(r / 0.05, 6).is_integer() for r in ratios)


def test_numeric_fields_are_searched_on_a_grid_so_drawn_nodes_repeat_and_share_computed_prefixes():
    import optuna

    grid = {round(0.1 + 0.05 * k, 10) for k in range(17)}  # pruning_ratio: 0.1, 0.15, ..., 0.9
    space = _space([{"kind": "pruning"}], prefix=1)
    assert _dims(space)["pruning#1.pruning_ratio"].step == 0.05
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [space.suggest(study.ask())[1][1]["pruning_ratio"] for _ in range(40)]
    assert set(drawn) <= grid and len(set(drawn)) < len(drawn)  # written as the grid's points, and repeated

    continuous = _space([{"kind": "pruning"}], prefix=1, space={"pruning": {"pruning_ratio": {"step": None}}})
    assert _dims(continuous)["pruning#1.pruning_ratio"].step is None
    logged = _space([{"kind": "pruning"}], prefix=1,
                    space={"pruning": {"pruning_ratio": {"low": 0.1, "high": 0.8, "log": True}}})
    assert _dims(logged)["pruning#1.pruning_ratio"].step is None  # a log range drops the declared grid
    narrowed = _space([{"kind": "pruning"}], prefix=1,
                      space={"pruning": {"pruning_ratio": {"low": 0.5, "high": 0.9, "step": 0.1}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    assert {narrowed.suggest(study.ask())[1][1]["pruning_ratio"] for _ in range(30)} <= {0.5, 0.6, 0.7, 0.8, 0.9}
    fitted = _space([{"kind": "pruning"}], prefix=1, space={"pruning": {"pruning_ratio": {"low": 0.33, "high": 0.9}}})
    assert _dims(fitted)["pruning#1.pruning_ratio"].step == pytest.approx(0.57 / 12)  # the declared 0.05, fitted


def test_the_printed_space_names_each_range_with_its_grid_step():
    space = _space([{"kind": "pruning"}], prefix=1,
                   space={"pruning": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}})
    lines = space.describe().splitlines()
    assert "  pruning#1.pruning_ratio in [0.1, 0.9], step 0.05" in lines
    assert "  pruning#1.learning_rate in [0.0001, 0.01] (log)" in lines  # continuous: no step
    assert "  pruning#1.importance in ['magnitude', 'lamp', 'taylor']" in lines


@pytest.mark.parametrize("space, message", [
    ({"pruning": {"nope": {"low": 0, "high": 1}}}, "search.space.pruning.nope: pruning has no field 'nope'"),
    ({"pruning": {"pruning_ratio": {"lo": 0.1}}}, "search.space.pruning.pruning_ratio.lo: unknown key 'lo'"),
    ({"pruning": {"pruning_ratio": {"low": 0.9, "high": 0.1}}}, "needs low < high"),
    ({"prunning": {}}, "search.space.prunning: not a node kind or a node index"),
    ({"0": {"epochs": {"low": 1, "high": 2}}}, "search.space.0: node 0 is not searched"),
    ({"pruning": {"pruning_ratio": {"step": 0}}}, "search.space.pruning.pruning_ratio.step = 0: a grid step is a "
                                                  "number > 0"),
    ({"pruning": {"pruning_ratio": {"step": 0.07}}}, "step 0.07 does not divide [0.1, 0.9] into whole steps"),
    ({"pruning": {"pruning_ratio": {"log": True, "step": 0.1}}}, "log ranges take no step"),
])
def test_a_bad_space_is_one_line_naming_the_field(space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _space([{"kind": "pruning"}], space=space)


def _inserted(**search):
    space = derive_space(load_setup("composite_1"), SearchConfig.parse({"moves": {"insert": ["distillation"]},
                                                                        **search}))
    return space, {d.name: d for d in space.dimensions() if d.name.startswith("distillation+")}


def test_an_inserted_distillation_searches_its_length_and_starts_at_the_shortest():
    import optuna

    space, dims = _inserted()
    epochs = dims["distillation+.epochs"]
    assert (epochs.type, epochs.low, epochs.high, epochs.step) == ("int", 3, 30, 3)  # the default template's range
    assert space.templates["distillation+"].node["epochs"] == 3
    assert space.defined("distillation+")["distillation+.epochs"] == 3
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(40):
        label, nodes = space.suggest(study.ask())
        for node in nodes:
            if node["kind"] == "distillation":
                drawn.add(node["epochs"])
                load_setup({"name": "x", "nodes": nodes})  # a valid setup with the length drawn
    assert drawn <= set(range(3, 31, 3)) and len(drawn) >= 3


def test_an_insert_template_field_given_as_a_range_is_searched_and_search_space_overrides_it():
    _, dims = _inserted(insert_templates={"distillation": {"epochs": 5, "task_weight": 1.0}})
    assert "distillation+.epochs" not in dims  # a plain value: fixed
    _, dims = _inserted(insert_templates={"distillation": {"epochs": {"low": 2, "high": 8, "step": 2},
                                                           "temperature": {"choices": [2.0, 4.0]}}})
    assert (dims["distillation+.epochs"].low, dims["distillation+.epochs"].high) == (2, 8)
    assert dims["distillation+.temperature"].choices == (2.0, 4.0)
    _, dims = _inserted(space={"distillation": {"epochs": {"low": 3, "high": 9}}})
    assert (dims["distillation+.epochs"].high, dims["distillation+.epochs"].step) == (9, None)  # the user's wins
    _, dims = _inserted(space={"distillation": {"epochs": False}})
    assert "distillation+.epochs" not in dims and "distillation+.temperature" in dims


@pytest.mark.parametrize("template, message", [
    ({"epochs": {"low": 3, "high": 20, "step": 3}},
     "search.insert_templates.distillation.epochs: step 3 does not divide [3, 20] into whole steps"),
    ({"epochs": {"step": 3}}, "search.insert_templates.distillation.epochs = {'step': 3}: a range needs low and high"),
    ({"epochs": {"low": 3, "high": 9, "grid": 3}},
     "search.insert_templates.distillation.epochs.grid: unknown key; allowed: low, high"),
])
def test_a_bad_insert_template_range_is_one_line_naming_it(template, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[").replace("{", r"\{")):
        _inserted(insert_templates={"distillation": template})


def test_a_space_with_nothing_to_search_is_empty():
    space = _space([{"kind": "pruning"}], space={"pruning": False})
    assert space.is_empty()
