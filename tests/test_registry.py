"""Every registered node kind: its config validates, serialises to JSON and reloads as the same config."""
import json

import pytest

from fedcore_adapter.registry import get_node, known_kinds
from fedcore_adapter.schema import validate_node

# Non-default options per kind, so the round trip carries more than defaults (nested choices included).
OPTIONS = {
    "low_rank": [{"method": {"name": "svd", "thresholds": [0.8, 0.9], "budget": {"metric": "macs", "ratio": 0.5}}},
                 {"method": {"name": "falor", "metric": {"name": "cosine", "threshold": 0.02}, "allocation": "global",
                             "fit": {"name": "sequential", "weighting": "gradient", "refit_kept": True}}}],
    "pruning": [{"pruning_ratio": {"0": 0.25}, "finetune_params": {"epochs": 2}}],
    "ptq_dynamic": [{"auto_skip": {"error_budget": 0.01}, "skip": ["head*"]}],
}
CASES = [(kind, options) for kind in known_kinds() for options in [{}, *OPTIONS.get(kind, [])]]


def test_every_builtin_kind_is_exercised():
    assert {"training", "distillation", "pruning", "unstructured_pruning", "low_rank", "ptq_dynamic", "ptq_static",
            "qat"} <= {kind for kind, _ in CASES}


@pytest.mark.parametrize("kind, options", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_a_config_of_every_registered_kind_round_trips_through_json(kind, options):
    config = validate_node(0, {"kind": kind, **options})
    assert isinstance(config, get_node(kind).config_cls)
    text = config.model_dump_json()
    reloaded = validate_node(0, json.loads(text))
    assert reloaded == config and reloaded.model_dump_json() == text
