"""Quantization configs: FedCore names, JSON round trips, and one-line errors for bad values."""
import pytest

from fedcore_adapter.errors import ConfigError
from fedcore_adapter.nodes.quantization import AutoSkip, PTQDynamicConfig, PTQStaticConfig, QATConfig
from fedcore_adapter.building import resolve_setup as load_setup


def fedcore_setup(node: str, params: dict) -> dict:
    return {"compression_task": "composite_compression", "need_pretrain": False, "common": {"save_each": -1},
            "model_params": {node: params}, "initial_assumption": [node]}


def test_fedcore_post_dynamic_quant_becomes_ptq_dynamic_with_its_flags():
    setup = load_setup(fedcore_setup("post_dynamic_quant", {"epochs": 1, "allow_conv": True, "allow_emb": False}))
    node = setup.nodes[0]
    assert isinstance(node, PTQDynamicConfig)
    assert (node.allow_conv, node.allow_emb, node.epochs) == (True, False, 1)


def test_fedcore_training_aware_quant_and_post_training_quant_keep_their_epochs():
    qat = load_setup(fedcore_setup("training_aware_quant", {"epochs": 10})).nodes[0]
    static = load_setup(fedcore_setup("post_training_quant", {"epochs": 2})).nodes[0]
    assert isinstance(qat, QATConfig) and qat.epochs == 10
    assert isinstance(static, PTQStaticConfig) and static.epochs == 2


def test_every_quantization_node_produces_int8_and_only_qat_trains_float_weights():
    assert PTQDynamicConfig.produces_int8 and PTQStaticConfig.produces_int8 and QATConfig.produces_int8
    assert QATConfig.trains_float_weights and not PTQDynamicConfig.trains_float_weights
    assert not PTQStaticConfig.trains_float_weights


@pytest.mark.parametrize("config", [
    PTQDynamicConfig(allow_emb=True, smooth_alpha=0.7, skip=["encoder.*.output.dense"]),
    PTQStaticConfig(observer="percentile", percentile=99.9, auto_skip=AutoSkip(error_budget=0.02)),
    QATConfig(epochs=3, learnable_scales=True, backend="fbgemm"),
], ids=lambda c: c.kind)
def test_every_config_round_trips_through_json(config):
    assert type(config).model_validate_json(config.model_dump_json()) == config


def test_torch_spellings_of_int8_are_accepted():
    assert PTQDynamicConfig(dtype="qint8").dtype == "int8"
    assert PTQStaticConfig(dtype="torch.quint8").dtype == "int8"


@pytest.mark.parametrize("field, value, allowed", [
    ("dtype", "int4", "'int8'"),
    ("backend", "tensorrt", "'x86', 'fbgemm', 'onednn' or 'qnnpack'"),
])
def test_unsupported_dtype_or_backend_names_the_node_field_and_valid_values(field, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_setup({"nodes": [{"kind": "ptq_dynamic", field: value}]})
    assert str(err.value) == f"nodes[0] (ptq_dynamic).{field} = '{value}': Input should be {allowed}"


def test_qat_with_zero_epochs_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"nodes\[0\] \(qat\)\.epochs = 0: .*QAT needs at least 1 training epoch"):
        load_setup(fedcore_setup("training_aware_quant", {"epochs": 0}))


def test_static_observer_must_be_one_of_the_four_estimators():
    with pytest.raises(ConfigError, match=r"observer = 'mse'.*'minmax', 'moving_average', 'histogram' or 'percentile'"):
        load_setup({"nodes": [{"kind": "ptq_static", "observer": "mse"}]})


def test_training_after_an_int8_conversion_is_refused_for_the_whole_chain():
    with pytest.raises(ConfigError,
                       match=r"nodes\[1\] \(qat\) trains float weights but follows nodes\[0\] \(ptq_static\)"):
        load_setup({"nodes": [{"kind": "ptq_static"}, {"kind": "qat"}]})
