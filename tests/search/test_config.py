"""``search.*`` (``SearchConfig``): what the options mean where they are computed from the search's own figures."""
from __future__ import annotations

import math

import pytest

from fedcore_adapter.errors import ConfigError
from fedcore_adapter.search.config import AUTO_MARGIN_UNKNOWN, SearchConfig


def test_the_early_stop_margin_is_by_default_twice_the_standard_error_of_the_reference_validation_accuracy():
    scfg = SearchConfig.parse({})
    assert scfg.early_stop.margin == "auto"
    # MNIST-1D's 400 validation samples at 0.9575: about 2 pt (the fixed margin searches used before)
    assert scfg.early_stop_margin(0.9575, 400) == pytest.approx(2 * math.sqrt(0.9575 * 0.0425 / 400))
    assert scfg.early_stop_margin(0.9575, 400) == pytest.approx(0.0202, abs=1e-4)
    # 2,000 samples at 0.984: about 0.56 pt
    assert scfg.early_stop_margin(0.984, 2000) == pytest.approx(0.00561, abs=1e-5)


def test_the_auto_margin_is_at_least_half_the_constraint_and_the_fixed_one_without_the_splits_size():
    scfg = SearchConfig.parse({"max_accuracy_drop": 0.02})
    assert scfg.early_stop_margin(0.99, 1_000_000) == pytest.approx(0.01)  # a later node recovers that much
    assert scfg.early_stop_margin(0.9, None) == AUTO_MARGIN_UNKNOWN
    assert scfg.early_stop_margin(None, 400) == AUTO_MARGIN_UNKNOWN


def test_a_margin_given_as_a_number_is_used_as_it_is():
    assert SearchConfig.parse({"early_stop": {"margin": 0.01}}).early_stop_margin(0.9, 32) == 0.01
    assert SearchConfig.parse({"early_stop": {"margin": "0"}}).early_stop_margin(0.9, 32) == 0.0


@pytest.mark.parametrize("margin", [-0.01, "wide", True, None, float("nan")])
def test_a_margin_that_is_not_auto_or_an_accuracy_is_a_one_line_error_naming_both(margin):
    with pytest.raises(ConfigError) as err:
        SearchConfig.parse({"early_stop": {"margin": margin}})
    assert f"search.early_stop.margin = {margin!r}: margin must be auto or an accuracy >= 0" in str(err.value)
    assert "\n" not in str(err.value)
