"""FedCore-format setup dicts are converted to native setups."""
import pytest

from fedcore_adapter.errors import ConfigError
from fedcore_adapter.fedcore_format import from_fedcore, to_fedcore
from fedcore_adapter.schema import Setup

RAW_FEDCORE = {
    "compression_task": "composite_compression",
    "need_pretrain": False,
    "common": {"save_each": 10, "batch_limit": 5, "calib_batch_limit": 2},
    "model_params": {"training_model": {"epochs": 100}},
    "initial_assumption": ["training_model"],
}


def test_fedcore_dict_converts_chain_params_and_common():
    setup = Setup.parse({**RAW_FEDCORE})
    assert [n.kind for n in setup.nodes] == ["training"]
    assert setup.nodes[0].epochs == 100
    assert (setup.common.save_each, setup.common.limit_train_batches, setup.common.limit_valid_batches) == (10, 5, 2)


def test_missing_initial_assumption_is_one_clear_error():
    data = {k: v for k, v in RAW_FEDCORE.items() if k != "initial_assumption"}
    with pytest.raises(ConfigError, match="missing 'initial_assumption'"):
        from_fedcore(data)


def test_unknown_fedcore_node_lists_known_names():
    with pytest.raises(ConfigError,
                       match=r"initial_assumption\[0\] = 'magic_model'.*known: .*pruning_model.*training_model"):
        from_fedcore({**RAW_FEDCORE, "initial_assumption": ["magic_model"]})


def test_unknown_common_keys_warn_and_are_dropped():
    with pytest.warns(UserWarning, match=r"\['p'\]"):
        out = from_fedcore({**RAW_FEDCORE, "common": {"save_each": -1, "p": 1}})
    assert out["common"] == {"save_each": -1}


def test_native_to_fedcore_and_back_is_the_same_setup():
    setup = Setup.parse({**RAW_FEDCORE})
    again = Setup.parse(to_fedcore(setup.to_dict()))
    assert again.nodes == setup.nodes and again.common.save_each == 10
