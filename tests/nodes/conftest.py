"""Fixtures of the node tests: the trained tiny conv net and its data (models and data in test_quantization)."""
import pytest

from tests.nodes.test_quantization import ConvDataModule, trained_conv


@pytest.fixture(scope="module")
def conv_model():
    return trained_conv()


@pytest.fixture
def conv_dm():
    return ConvDataModule()
