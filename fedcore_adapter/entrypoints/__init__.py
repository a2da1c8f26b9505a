"""The seed's three scripts as ``fedcore-adapter`` subcommands (Hydra apps on conf/train.yaml, fit_target.yaml,
inference.yaml)::

    fedcore-adapter train setup=composite_1 model=seq_gru data=event_sequences save_encoder=enc
    fedcore-adapter fit-target setup=composite_1 model=seq_gru data=event_sequences fold_list=[0,1,2]
    fedcore-adapter inference model=seq_gru data=event_sequences inference_model=enc inference.output=out

Kept import-light (``cli`` imports it for ``--help``): each command imports its module, and torch, only when run.
"""
from __future__ import annotations

from typing import Optional


def train(argv: list[str]) -> Optional[int]:
    from .train import main  # lazy: torch; `fedcore-adapter --help` imports this module

    return main(argv)


def fit_target(argv: list[str]) -> Optional[int]:
    from .fit_target import main  # lazy: torch, as above

    return main(argv)


def inference(argv: list[str]) -> Optional[int]:
    from .inference import main  # lazy: torch, as above

    return main(argv)
