"""Low-rank nodes: truncated SVD with rank strategies and a global budget, FedCore's regularised
U,S,Vh training, activation-aware (falor) decomposition, and the decompose_config that rebuilds them.

Modules: ``config`` (LowRankConfig, the flat-form conversion), ``svd_config`` / ``falor_config`` (each
method's options), ``node`` (the apply function), ``svd_pipeline`` / ``falor_pipeline`` (each method's
flow), ``allocation`` (the rank allocators: energy budget, falor global and budget), ``budget`` (the
Budget target), ``layers`` (FactorizedLayer), ``svd`` (math), ``targets`` (which layers, their costs),
``rank_strategies``, ``regularized`` (FedCore's U,S,Vh training), ``falor`` (search math),
``sequential`` (falor's error-compensating fit), ``output_weights`` (its gradient weighting),
``calibration`` (layer statistics), ``sensitivity`` (per-layer spectrum jobs), ``decompose_config``
(JSON + replay).
"""
from .budget import Budget
from .config import LowRankConfig
from .decompose_config import apply_decompose_config
from .falor_config import FalorMethod
from .layers import FactorizedLayer
from .node import apply_low_rank
from .sensitivity import rank_sensitivity
from .svd_config import SVDMethod

__all__ = ["Budget", "FactorizedLayer", "FalorMethod", "LowRankConfig", "SVDMethod", "apply_decompose_config",
           "apply_low_rank", "rank_sensitivity"]
