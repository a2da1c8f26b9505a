"""Pruning nodes: ``pruning`` (structural channel / head removal) and ``unstructured_pruning`` (sparsity).

- :mod:`.config` — the two configs and the FedCore parameter names they accept.
- :mod:`.structured` — torch-pruning dependency-graph channel removal for any traceable model.
- :mod:`.transformers` — attention heads and FFN channels of transformer encoders (hidden size kept).
- :mod:`.factors` — how pruning recognises a low-rank factor pair (``second(first(x))``).
- :mod:`.history` — the recorded removals and their replay on a freshly built model.
- :mod:`.node` / :mod:`.unstructured` — the apply functions (iterations, fine-tuning, reports).
- :mod:`.sensitivity` — :func:`pruning_sensitivity`, independent per-(layer group, ratio) measurements.
"""
from .config import PruningConfig, UnstructuredPruningConfig
from .history import REPLAY_NAME, replay_pruning
from .node import apply_pruning
from .sensitivity import pruning_sensitivity
from .structured import PruningWarning
from .unstructured import apply_unstructured_pruning

__all__ = ["PruningConfig", "UnstructuredPruningConfig", "apply_pruning", "apply_unstructured_pruning",
           "pruning_sensitivity", "PruningWarning", "REPLAY_NAME", "replay_pruning"]
