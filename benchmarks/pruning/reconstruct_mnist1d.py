"""Structured pruning of the MNIST-1D CNN trained by RAW, without any fine-tune: test accuracy with and without
the pruning node's least-squares re-fit (``reconstruct: true``).

    python -m benchmarks.pruning.reconstruct_mnist1d [--raw /tmp/search_bench_raw] [--ratios 0.3 0.5 0.7]
        [--importances magnitude taylor] [--calibration-batches 16]

RAW (100 epochs) is trained once and cached under ``--raw`` (the search benchmark's cache). For each ratio and
importance, one ``pruning`` node (one step, no fine-tune) prunes a copy, once as is and once with
``reconstruct: true`` on ``--calibration-batches`` training batches of 128; MACs and params are counted on the
pruned model, accuracy on the 1,000 test samples. What this shows: how much of what pruning loses is the
consumers' mis-fit (repaired in closed form, in seconds) rather than lost capacity (which only training repairs).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from fedcore_adapter import run_setup
from fedcore_adapter.checkpoint import load_model
from fedcore_adapter.metrics import count_macs, count_params, evaluate
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
from fedcore_adapter.zoo.models import MNIST1DCNN

from benchmarks.common import environment, markdown
from benchmarks.search.mnist1d import raw_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--raw", type=Path, default=Path("/tmp/search_bench_raw"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--importances", nargs="+", default=["magnitude", "taylor"])
    parser.add_argument("--calibration-batches", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    raw = load_model(raw_model(args.raw) / "final", MNIST1DCNN()).eval()
    dm = MNIST1DDataModule()
    device = torch.device("cpu")
    example = next(iter(dm.test_dataloader()))[0][:1]
    loss = torch.nn.CrossEntropyLoss()

    def accuracy(model: torch.nn.Module) -> float:
        return evaluate(model, dm.test_dataloader(), loss, device)["accuracy"]

    raw_accuracy, raw_macs, raw_params = accuracy(raw), count_macs(raw, example), count_params(raw)

    def row(name: str, model: torch.nn.Module, seconds: float) -> dict:
        acc = accuracy(model)
        return {"variant": name, "test_accuracy": round(acc, 4), "drop_pt": round(100 * (raw_accuracy - acc), 1),
                "macs_reduction": round(raw_macs / count_macs(model, example), 2),
                "params_reduction": round(raw_params / count_params(model), 2), "node_s": round(seconds, 1)}

    rows = [row("RAW", raw, 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            for importance in args.importances:
                for reconstruct in (False, True):
                    node = {"kind": "pruning", "pruning_ratio": ratio, "importance": importance,
                            "reconstruct": reconstruct, "calibration_batches": args.calibration_batches}
                    start = time.perf_counter()
                    folder = Path(tmp) / f"{ratio}_{importance}_{reconstruct}"
                    result = run_setup({"name": "p", "common": {"measure": False}, "nodes": [node]},
                                       copy.deepcopy(raw), dm, output_dir=folder)
                    seconds = time.perf_counter() - start
                    name = f"{importance} {ratio:g}" + (" + reconstruct" if reconstruct else "")
                    rows.append(row(name, result.model.eval(), seconds))
                    print(rows[-1], flush=True)
    print(environment())
    print(markdown(rows, list(rows[0])))


if __name__ == "__main__":
    main()
