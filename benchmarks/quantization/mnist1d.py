"""MNIST-1D CNN after RAW, then dynamic, static and QAT int8: accuracy, size and latency vs fp32.

    python -m benchmarks.quantization.mnist1d [--seed 42] [--raw-epochs 100] [--qat-epochs 10] [--json out.json]

RAW (the named setup: 100 training epochs) trains the fp32 model; every
quantization node then runs on that model through the engine (``run_setup``),
exactly as a setup would chain it. Accuracy is on the 1000 MNIST-1D test
samples; sizes are the checkpoint bytes; latency is one test batch (256
samples), 2 threads, variants interleaved round by round (``quant_timing``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from fedcore_adapter import run_setup
from fedcore_adapter.metrics import evaluate
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
from fedcore_adapter.zoo.models import MNIST1DCNN

from benchmarks.common import environment, markdown
from benchmarks.timing import interleaved_latency


def run_nodes(nodes: list[dict], model: torch.nn.Module, dm, out: Path, seed: int):
    setup = {"name": "q", "common": {"measure": False, "seed": seed}, "nodes": nodes}
    result = run_setup(setup, model, dm, output_dir=out)
    return result.model, (result.output_dir / "final" / "state.pt").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--raw-epochs", type=int, default=100)
    parser.add_argument("--qat-epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    dm = MNIST1DDataModule(seed=args.seed)
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(args.seed)
        fp32, fp32_size = run_nodes([{"kind": "training", "epochs": args.raw_epochs, "progress": False}], MNIST1DCNN(),
                                    dm, tmp / "raw", args.seed)
        fp32.eval()
        variants["fp32 (RAW)"] = (fp32, fp32_size)
        nodes = {
            "ptq_dynamic allow_conv": {"kind": "ptq_dynamic", "allow_conv": True},
            "ptq_dynamic (Linear only)": {"kind": "ptq_dynamic"},
            "ptq_static histogram": {"kind": "ptq_static"},
            "ptq_static percentile": {"kind": "ptq_static", "observer": "percentile"},
            f"qat {args.qat_epochs} epochs": {"kind": "qat", "epochs": args.qat_epochs, "progress": False},
            f"qat {args.qat_epochs} epochs LSQ": {"kind": "qat", "epochs": args.qat_epochs, "learnable_scales": True,
                                                  "progress": False},
        }
        for i, (name, node) in enumerate(nodes.items()):
            variants[name] = run_nodes([node], fp32, dm, tmp / f"v{i}", args.seed)
    x = next(iter(dm.test_dataloader()))[0]
    timing = interleaved_latency({name: (lambda m=m: m(x)) for name, (m, _) in variants.items()}, "fp32 (RAW)",
                                 rounds=args.rounds, per_round=10)
    rows = []
    for name, (model, size) in variants.items():
        acc = evaluate(model, dm.test_dataloader(), None, torch.device("cpu"))["accuracy"]
        rows.append({"variant": name, "test_accuracy": acc, "size_kb": size / 1024,
                     "size_ratio": variants["fp32 (RAW)"][1] / size, "latency_ms": timing[name]["latency_ms"],
                     "speedup": timing[name]["speedup"],
                     "speedup_range": f"{timing[name]['speedup_min']:.2f}-{timing[name]['speedup_max']:.2f}"})
    base = rows[0]["test_accuracy"]
    for row in rows:
        row["acc_delta_points"] = 100 * (row["test_accuracy"] - base)
    print(environment(), f"seed {args.seed}")
    print(markdown(rows, list(rows[0])))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
