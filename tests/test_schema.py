"""The setup schema: validation errors name the node, the field, the value and what is allowed."""
from typing import ClassVar, Literal

import pytest

from fedcore_adapter.errors import ConfigError
from fedcore_adapter.registry import register_node
from fedcore_adapter.schema import NodeConfig, Setup


class _ToInt8Config(NodeConfig):
    kind: Literal["test_to_int8"] = "test_to_int8"
    produces_int8: ClassVar[bool] = True


register_node(_ToInt8Config)(lambda model, config, ctx: model)


def test_native_setup_validates_nodes_by_kind():
    setup = Setup.parse({"name": "S", "nodes": [{"kind": "training", "epochs": 3}, {"kind": "distillation"}]})
    assert [n.kind for n in setup.nodes] == ["training", "distillation"]
    assert setup.nodes[0].epochs == 3
    assert setup.common.save_each == -1


def test_unknown_kind_lists_registered_kinds():
    with pytest.raises(ConfigError, match=r"unknown node kind 'prune'.*registered kinds: .*distillation.*training"):
        Setup.parse({"nodes": [{"kind": "prune"}]})


@pytest.mark.parametrize("field, value, message", [
    ("epochs", -1, r"nodes\[1\] \(training\)\.epochs = -1: Input should be greater than or equal to 0"),
    ("learning_rate", "abc", r"nodes\[1\] \(training\)\.learning_rate = 'abc': Input should be a valid number"),
    ("optimizer", "adagrad", r"optimizer = 'adagrad': Input should be 'adam', 'adamw' or 'sgd'"),
    ("epochz", 3, r"nodes\[1\] \(training\)\.epochz = 3: unknown field; allowed: custom_loss, .*epochs, .*weight_decay$"),
])
def test_bad_node_field_names_index_field_value_and_allowed(field, value, message):
    with pytest.raises(ConfigError, match=message):
        Setup.parse({"nodes": [{"kind": "training"}, {"kind": "training", field: value}]})


def test_bad_common_option_is_named():
    with pytest.raises(ConfigError, match=r"common\.save_each = 0: .*-1 \(end of node only\) or a positive"):
        Setup.parse({"common": {"save_each": 0}, "nodes": [{"kind": "training"}]})


def test_an_unknown_nested_or_common_field_lists_the_fields_allowed_there():
    with pytest.raises(ConfigError, match=r"nodes\[0\] \(pruning\)\.finetune_params\.epochz = 1: unknown field; "
                                          r"allowed: custom_loss, distill, .*keep_best, learning_rate"):
        Setup.parse({"nodes": [{"kind": "pruning", "finetune_params": {"epochz": 1}}]})
    with pytest.raises(ConfigError, match=r"common\.sed = 1: unknown field; allowed: device, .*, seed$"):
        Setup.parse({"common": {"sed": 1}, "nodes": [{"kind": "training"}]})


def test_empty_chain_is_rejected():
    with pytest.raises(ConfigError, match="has no nodes"):
        Setup.parse({"name": "E", "nodes": []})


def test_training_after_int8_conversion_is_rejected_with_the_whole_chain():
    with pytest.raises(ConfigError, match=r"nodes\[1\] \(training\) trains float weights but follows nodes\[0\] "
                                          r"\(test_to_int8\).*\(test_to_int8 -> training\)"):
        Setup.parse({"name": "Q", "nodes": [{"kind": "test_to_int8"}, {"kind": "training"}]})


def test_setup_round_trips_through_json():
    setup = Setup.parse({"name": "S", "common": {"seed": 3}, "nodes": [{"kind": "training", "epochs": 2}]})
    again = Setup.parse(setup.to_dict())
    assert again == setup
