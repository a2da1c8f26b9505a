"""The setup schema: validation errors name the node, the field, the value and what is allowed."""
import re
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
    ("epochz", 3, r"nodes\[1\] \(training\)\.epochz = 3: unknown field \(did you mean epochs\?\); allowed: "
                   r"custom_loss, .*epochs, .*weight_decay$"),
])
def test_bad_node_field_names_index_field_value_and_allowed(field, value, message):
    with pytest.raises(ConfigError, match=message):
        Setup.parse({"nodes": [{"kind": "training"}, {"kind": "training", field: value}]})


def test_bad_common_option_is_named():
    with pytest.raises(ConfigError, match=r"common\.save_each = 0: .*-1 \(end of node only\) or a positive"):
        Setup.parse({"common": {"save_each": 0}, "nodes": [{"kind": "training"}]})


def test_an_unknown_nested_or_common_field_lists_the_fields_allowed_there():
    with pytest.raises(ConfigError, match=r"nodes\[0\] \(pruning\)\.finetune_params\.epochz = 1: unknown field "
                                          r"\(did you mean epochs\?\); "
                                          r"allowed: custom_loss, distill, .*keep_best, learning_rate"):
        Setup.parse({"nodes": [{"kind": "pruning", "finetune_params": {"epochz": 1}}]})
    with pytest.raises(ConfigError, match=r"common\.sed = 1: unknown field \(did you mean seed\?\); "
                                          r"allowed: device, .*, seed$"):
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


# -- quick runs ------------------------------------------------------------------------------------------------
def _epochs(setup) -> list:
    """Every epochs count of every node, nested fine-tunes included, as (node index, path, value)."""
    found = []

    def walk(model, i, path):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if hasattr(type(value), "model_fields"):
                walk(value, i, f"{path}{name}.")
            elif name == "epochs" and isinstance(value, int):
                found.append((i, path + name, value))

    for i, node in enumerate(setup.nodes):
        walk(node, i, "")
    return found


def test_epochs_scale_scales_every_epoch_count_of_every_node_rounding_up():
    from fedcore_adapter.building import resolve_setup

    full = resolve_setup("composite_1")
    quick = resolve_setup("composite_1", {"common": {"epochs_scale": 0.1}})
    expected = [(i, path, -(-value // 10) if value else 0) for i, path, value in _epochs(full)]
    assert _epochs(quick) == expected
    assert any(path == "finetune_params.epochs" and value == 1 for _, path, value in _epochs(quick))


def test_max_epochs_reaches_training_fine_tunes_low_rank_and_qat():
    from fedcore_adapter.building import resolve_setup

    for name in ("TEST", "QAT_1", "PTQ_1", "COMPOSITE_2"):
        quick = resolve_setup(name, {"common": {"max_epochs": 1}})
        assert all(value <= 1 for _, _, value in _epochs(quick)), name
        assert any(value == 1 for _, _, value in _epochs(quick))


def test_limit_batches_caps_every_batch_count_and_the_quick_options_apply_once():
    from fedcore_adapter.building import resolve_setup

    quick = resolve_setup("QAT_1", {"common": {"limit_batches": 2, "limit_valid_batches": 1, "max_epochs": 1}})
    common = quick.common
    assert (common.limit_train_batches, common.limit_valid_batches, common.limit_test_batches) == (2, 1, 2)
    assert quick.nodes[-1].calibration_batches == 2  # QAT's own count (4) capped
    assert (common.epochs_scale, common.max_epochs, common.limit_batches) == (None, None, None)
    assert Setup.parse(quick.to_dict()) == quick  # the setup as it ran re-validates to itself


def test_node_overrides_by_index_and_kind_still_apply_before_the_quick_options():
    from fedcore_adapter.building import resolve_setup

    quick = resolve_setup("COMPOSITE_1", {"common": {"epochs_scale": 0.5},
                                          "nodes": {"0": {"epochs": 8}, "low_rank": {"method": {"epochs": 6}}}})
    assert (quick.nodes[0].epochs, quick.nodes[2].method.epochs) == (4, 3)


@pytest.mark.parametrize("field, value, message", [
    ("epochs_scale", 0, "common.epochs_scale = 0: Input should be greater than 0"),
    ("max_epochs", 0, "common.max_epochs = 0: Input should be greater than or equal to 1"),
    ("limit_batches", "many", "common.limit_batches = 'many': Input should be a valid integer"),
])
def test_quick_options_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Setup.parse({"common": {field: value}, "nodes": [{"kind": "training"}]})


def test_a_validators_own_message_is_the_error_without_pydantics_label():
    from pydantic import BaseModel, ValidationError, field_validator

    from fedcore_adapter.schema import validation_message

    class Odd(BaseModel):
        n: int

        @field_validator("n")
        @classmethod
        def _odd(cls, v):
            if v % 2 == 0:
                raise ValueError(f"n must be odd (got {v})")
            return v

    with pytest.raises(ValidationError) as err:
        Odd(n=2)
    assert validation_message("odd", err.value, Odd) == "odd.n = 2: n must be odd (got 2)"
