"""Low-rank factor pairs as the pruning nodes see them.

A low-rank node leaves modules computing ``second(first(x))``. Pruning recognises them by
those two attributes (it imports no other node): a producer's output rows live in ``second``,
a consumer's input columns in ``first``, and the inner width between them is the pair's rank.
"""
from __future__ import annotations

from typing import Literal, Optional

from torch import nn


def factor_part(module: nn.Module, part: Literal["first", "second"]) -> Optional[nn.Module]:
    """``module.first`` or ``module.second`` when ``module`` is a factor pair, else None."""
    first, second = getattr(module, "first", None), getattr(module, "second", None)
    if isinstance(first, nn.Module) and isinstance(second, nn.Module):
        return first if part == "first" else second
    return None


def first_factors_of(model: nn.Module, seconds: list[nn.Module]) -> list[nn.Module]:
    """The ``first`` factor of every pair in ``model`` whose ``second`` is one of ``seconds``."""
    ids = {id(m) for m in seconds}
    return [factor_part(m, "first") for m in model.modules() if id(factor_part(m, "second")) in ids]
