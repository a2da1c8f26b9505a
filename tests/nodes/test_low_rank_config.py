"""The low_rank config: the method as a tagged choice with its own options, the flat (old, FedCore) form
converted by one validator, Hydra overrides reaching every option."""
import re
from pathlib import Path

import pytest
import yaml

from fedcore_adapter import get_experimental_setup, load_setup
from fedcore_adapter.errors import ConfigError
from fedcore_adapter.nodes.low_rank import FalorMethod, LowRankConfig, SVDMethod
from fedcore_adapter.nodes.low_rank.config import from_flat, to_flat
from fedcore_adapter.nodes.low_rank.falor_config import Cosine, Sequential
from tests.conftest import tiny_setup

README = Path(__file__).resolve().parents[2] / "README.md"

# The README's falor example as it was written before the methods had their own options.
README_FLAT = {"kind": "low_rank", "method": "falor", "layer_types": ["linear"], "exclude": ["pooler.*"],
               "allocation": "global", "falor_metric": "cosine", "budget": {"metric": "params", "value": 20016864},
               "falor_fit": "sequential", "falor_weighting": "gradient", "falor_refit_kept": True,
               "falor_damping": 1.0, "grid_points": 10, "metric_batches": 3}
# COMPOSITE_1's low_rank node before setups/ moved to the method form.
COMPOSITE_1_FLAT = {"kind": "low_rank", "epochs": 20, "learning_rate": 0.001, "hoyer_loss": 0.2, "orthogonal_loss": 5,
                    "thresholds": [0.9], "decomposing_mode": "channel", "spectrum_pruning_strategy": "energy",
                    "finetune_params": {"epochs": 10, "learning_rate": 0.001}}


def _readme_low_rank_node() -> dict:
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)]
    [node] = [n for b in blocks if isinstance(b, dict) for n in b.get("nodes", []) if n.get("kind") == "low_rank"]
    return node


def test_the_readme_falor_example_in_the_flat_form_is_the_readmes_method_form():
    documented = _readme_low_rank_node()
    assert isinstance(documented["method"], dict) and documented["method"]["name"] == "falor"
    assert LowRankConfig.model_validate(README_FLAT) == LowRankConfig.model_validate(documented)
    method = LowRankConfig.model_validate(documented).method
    assert isinstance(method, FalorMethod) and isinstance(method.metric, Cosine) and method.budget.value == 20016864
    assert isinstance(method.fit, Sequential) and (method.fit.weighting, method.fit.refit_kept, method.fit.damping) == \
        ("gradient", True, 1.0)


def test_a_named_setup_written_flat_is_the_shipped_method_form():
    shipped = load_setup("COMPOSITE_1").nodes[2]
    assert shipped == LowRankConfig.model_validate(COMPOSITE_1_FLAT)
    assert isinstance(shipped.method, SVDMethod) and shipped.method.epochs == 20


def test_from_flat_moves_each_option_under_its_method_and_to_flat_writes_it_back():
    nested = from_flat(README_FLAT)
    assert nested["method"] == {"name": "falor", "metric": {"name": "cosine"}, "allocation": "global",
                                "budget": {"metric": "params", "value": 20016864}, "grid_points": 10,
                                "metric_batches": 3, "fit": {"name": "sequential", "weighting": "gradient",
                                                             "refit_kept": True, "damping": 1.0}}
    config = LowRankConfig.model_validate(nested)
    assert LowRankConfig.model_validate(to_flat(config.model_dump())) == config
    assert from_flat({"kind": "low_rank", "method": {"name": "svd"}}) == {"kind": "low_rank",
                                                                         "method": {"name": "svd"}}


def test_fedcore_users_edit_the_flat_parameters_get_experimental_setup_returns():
    setup, _ = get_experimental_setup("COMPOSITE_2")
    params = setup["model_params"]["low_rank_model"]
    assert (params["method"], params["epochs"], params["thresholds"]) == ("svd", 10, [0.9])
    params.update(epochs=1, energy_thresholds=[0.8])
    del params["thresholds"]
    node = load_setup(setup).nodes[1]
    assert (node.method.epochs, node.method.thresholds) == (1, [0.8])


def test_hydra_overrides_reach_every_method_option():
    readme_setup = {"name": "README", "nodes": [_readme_low_rank_node()]}
    node = load_setup(readme_setup, {"nodes": {"low_rank": {"method": {"budget": {"value": 18000000},
                                                                       "fit": {"damping": 0.5}}}}}).nodes[0]
    assert (node.method.budget.value, node.method.fit.damping, node.method.fit.weighting) == (18000000, 0.5, "gradient")
    svd = load_setup("COMPOSITE_1", {"nodes": {"2": {"method": {"thresholds": [0.8]}}}}).nodes[2]
    assert (svd.method.thresholds, svd.method.epochs) == ([0.8], 20)


@pytest.mark.parametrize("node, message", [
    ({"thresholds": [0.5]}, r"thresholds = \[0.5\] \(the flat form\) and method.thresholds = \[0.9\] both given; "
                            r"give it once, under method"),
    ({"method": {"name": "falor", "fit": {"name": "projection", "refit_kept": True}}},
     r"method.falor.fit.projection.refit_kept = True: unknown field; allowed: name$"),
    ({"method": {"name": "falor", "epochs": 3}},
     r"method.falor.epochs = 3: unknown field; allowed: allocation, budget, "
     r"fit, grid_points, metric, metric_batches, name, statistic$"),
    ({"method": {"name": "svd", "metric": "nsr"}}, r"method.svd.metric = 'nsr': unknown field; allowed: budget, "
                                                    r"decomposing_mode, epochs, hoyer_loss, learning_rate, name, "
                                                    r"orthogonal_loss, rank, selection_tolerance, "
                                                    r"spectrum_pruning_strategy, thresholds$"),
    ({"method": {"name": "falor", "metric": {"name": "cosine", "kl_threshold": 0.1}}},
     r"method.falor.metric.cosine.kl_threshold = 0.1: unknown field \(did you mean threshold\?\); "
     r"allowed: name, threshold$"),
    ({"method": {"name": "falor", "metric": "cosine"}}, r"metric 'cosine' needs threshold"),
    ({"method": "pca"}, r"method = .*'pca'.*'svd', 'falor'"),
    ({"method": {"epochs": 3}}, r"method = .*name"),
    ({"method": "svd", "nsr_threshold": 0.1}, r"nsr_threshold is an option of method 'falor', not of 'svd'"),
])
def test_an_option_the_chosen_method_does_not_read_is_one_line_naming_it(node, message):
    base = {"kind": "low_rank", "method": {"name": "svd", "thresholds": [0.9]}}
    with pytest.raises(ConfigError, match=message) as info:
        load_setup(tiny_setup({**base, **node}))
    assert "\n" not in str(info.value)


def test_a_bare_method_name_takes_its_defaults():
    assert LowRankConfig.model_validate({"method": "falor"}).method == FalorMethod()
    assert LowRankConfig().method == SVDMethod() and LowRankConfig().method.thresholds == [0.9]
