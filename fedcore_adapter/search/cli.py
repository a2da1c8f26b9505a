"""``fedcore-adapter search [overrides...]``: a multi-objective search over composite chains.

    fedcore-adapter search setup=composite_1 search.trials=32 search.objectives=[macs,accuracy] \\
        search.max_accuracy_drop=0.01 cluster=local pretrained=composition_results/RAW

Hydra app on ``conf/search.yaml``; bad input is one line on stderr and exit status 2; a search in which no
trial meets the constraint ends with a line naming the closest trial and exit status 1.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from ..composition import run_hydra_app

SEARCH_SCOPED = ("search.space.", "search.insert_templates.")


def _task(cfg: Any) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    # lazy: the task's imports (torch, pydantic); `search --help` and `fedcore-adapter --help` import none of them
    from ..entrypoints.common import plain, reporting_errors
    from .driver import run_search

    logging.getLogger("fedcore_adapter").setLevel(logging.INFO)
    plain_cfg = plain(cfg)
    label = plain_cfg.get("model_name") or HydraConfig.get().runtime.choices.get("model")
    result = reporting_errors(plain_cfg, lambda: run_search(plain_cfg, model_label=label))
    print(result.message)
    print(f"results: {result.folder}")
    if not result.feasible:
        sys.exit(1)
    return None


def main(argv: list[str]) -> None:
    argv = ["++" + a if a.startswith(SEARCH_SCOPED) and "=" in a else a for a in argv]
    run_hydra_app(_task, "search", argv)
