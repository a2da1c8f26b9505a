"""Low-rank nodes: truncated SVD with rank strategies and a global budget, FedCore's regularised
U,S,Vh training, activation-aware (falor) decomposition, and the decompose_config that rebuilds them.

Modules: ``config`` (LowRankConfig), ``layers`` (FactorizedLayer), ``svd`` (math), ``targets``
(which layers, their costs), ``rank_strategies``, ``budget``, ``regularized`` (FedCore flow),
``falor``, ``sequential`` (falor's error-compensating fit), ``output_weights`` (its gradient
weighting), ``calibration`` (layer statistics),
``sensitivity`` (per-layer jobs for ``ctx.map``),
``decompose_config`` (JSON + replay), ``node`` (the apply function).
"""
from .config import Budget, LowRankConfig
from .decompose_config import apply_decompose_config
from .layers import FactorizedLayer
from .node import apply_low_rank
from .sensitivity import rank_sensitivity

__all__ = ["Budget", "FactorizedLayer", "LowRankConfig", "apply_decompose_config", "apply_low_rank",
           "rank_sensitivity"]
