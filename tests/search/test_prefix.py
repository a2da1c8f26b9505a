"""The search's input identity: what keys its computed prefixes."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from fedcore_adapter.search.prefix import identity_of


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU())


def test_the_same_structure_and_weights_give_the_same_identity():
    assert identity_of({}, _model()) == identity_of({}, copy.deepcopy(_model()))


def test_the_same_weights_in_another_structure_are_another_input():
    model, other = _model(), _model()
    other[1] = nn.GELU()  # no state of its own: the state dicts are equal
    assert identity_of({}, model) != identity_of({}, other)


def test_other_weights_are_another_input():
    model, other = _model(), _model()
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-6
    assert identity_of({}, model) != identity_of({}, other)


def test_a_model_with_packed_int8_weights_has_a_stable_identity():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(_model(), {nn.Linear}, dtype=torch.qint8)
    assert identity_of({}, quantized) == identity_of({}, copy.deepcopy(quantized))
    assert identity_of({}, quantized) != identity_of({}, _model())
