"""Search over composite chains (the seed's ``need_evo_opt``), above the engine.

- ``space``: the candidate chains and the searchable fields node configs declare (``schema.searchable``);
- ``driver.run_search(cfg)``: the Optuna study, the shared prefix, the trials on Dask, the results;
- ``trial.run_trial(payload)``: one trial where it runs; ``report``: trials.csv, the front, its plot, YAMLs.
"""
from __future__ import annotations

from typing import Any

__all__ = ["run_search", "SearchConfig", "derive_space"]


# Names imported on first use: `fedcore-adapter --help` imports this package, and the driver imports torch.
def __getattr__(name: str) -> Any:
    if name == "run_search":
        from .driver import run_search  # lazy: torch, see above

        return run_search
    if name == "SearchConfig":
        from .config import SearchConfig  # lazy: pydantic

        return SearchConfig
    if name == "derive_space":
        from .space import derive_space  # lazy: pydantic

        return derive_space
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
