"""Targets and setups for the search tests: the tiny MLP problem of tests/conftest, and a model that kills
its worker process the first time it is built (a lost worker)."""
from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import TinyDataModule, tiny_mlp

MODEL = {"_target_": "tests.helpers.build_tiny_mlp"}
DATA = {"_target_": "tests.helpers.build_tiny_data"}

SETUP = {"name": "TINY", "common": {"latency_repeats": 2, "latency_warmup": 1},
         "nodes": [{"kind": "training", "epochs": 8, "learning_rate": 0.01},
                   {"kind": "pruning", "pruning_ratio": 0.5, "finetune_params": {"epochs": 1, "learning_rate": 0.01}}]}


def config(tmp_path: Path, **search) -> dict:
    """A composed config as ``fedcore-adapter search`` builds it, on the tiny problem, in ``tmp_path``."""
    base = {"trials": 3, "objectives": ["params", "accuracy"], "max_accuracy_drop": 0.5, "seed": 0,
            "moves": {"drop": True, "insert": [], "reorder": True, "depth": 1},
            "early_stop": {"enabled": False}}
    return {"setup": SETUP, "model": dict(MODEL), "data": dict(DATA), "tracking": {"name": "none"},
            "cluster": {"name": "none"}, "output_dir": str(tmp_path / "out"), "model_name": "tiny",
            "search": {**base, **search}}


def die_once(marker: str):
    """The tiny MLP; the first call (no ``marker`` file yet) ends the calling process as a lost worker would."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only one process ever wins this
    except FileExistsError:
        return tiny_mlp()
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)


class TinyDataNoVal(TinyDataModule):
    """The tiny problem without a validation loader (train and test only)."""

    val_dataloader = None


def build_tiny_data_no_val():
    return TinyDataNoVal()
