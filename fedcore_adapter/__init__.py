"""fedcore_adapter: composite compression pipelines (training, pruning, low-rank, quantization, distillation).

Heavy modules are imported on first use so that ``import fedcore_adapter`` and
the CLI's ``--help`` stay fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run_setup": "fedcore_adapter.pipeline",
    "RunResult": "fedcore_adapter.engine",
    "Setup": "fedcore_adapter.schema",
    "load_setup": "fedcore_adapter.building",
    "resolve_setup": "fedcore_adapter.building",
    "build_run": "fedcore_adapter.building",
    "named_setups": "fedcore_adapter.setups",
    "load_model": "fedcore_adapter.checkpoint",
    "register_node": "fedcore_adapter.registry",
    "register_replay": "fedcore_adapter.structure",
    "Hook": "fedcore_adapter.hooks",
    "measure": "fedcore_adapter.metrics",
    "FedcoreError": "fedcore_adapter.errors",
    "ConfigError": "fedcore_adapter.errors",
    "fedcore_fit": "fedcore_adapter.api",
    "extract_loss": "fedcore_adapter.api",
    "eval_computational_metrics": "fedcore_adapter.api",
    "get_experimental_setup": "fedcore_adapter.api",
    "apply_decompose_config": "fedcore_adapter.nodes.low_rank",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedcore_adapter' has no attribute {name!r}")
