"""eval_computational_metrics against an independent measurement (torch.utils.benchmark.Timer).

For each model, the same batches are timed alternately by
``fedcore_adapter.eval_computational_metrics`` (which uses ``metrics.measure``)
and by ``torch.utils.benchmark.Timer.blocked_autorange`` under
``torch.inference_mode()``, ``--rounds`` times each, 2 threads fixed. Reported:
both latencies (ms per sample, median over rounds), their ratio (target within
10%; also the median of the per-round ratios, each pair taken back to back),
the coefficient of variation of repeated eval_computational_metrics calls
(target <= 5%), and the size against the bytes of the serialised state dict
(and, for the int8 model, what the seed's parameter-only size would have said).

    python -m benchmarks.engine.eval_metrics_timer --rounds 7 --json /tmp/eval_metrics.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from fedcore_adapter import eval_computational_metrics
from fedcore_adapter.data import batch_size, call_model, split_batch
from fedcore_adapter.zoo.models import MNIST1DCNN
from fedcore_adapter.zoo.sequences import EventSequenceDataModule, SeqGRUClassifier

from benchmarks.common import environment, markdown


def cases(n_batches: int) -> dict:
    """name -> (model, list of batches)."""
    torch.manual_seed(0)
    cnn = MNIST1DCNN().eval()
    cnn_batches = [(torch.randn(256, 1, 40), torch.randint(0, 10, (256,))) for _ in range(n_batches)]
    seq_loader = EventSequenceDataModule(num_samples=256 * n_batches * 5, eval_batch_size=256).test_dataloader()
    seq_batches = [b for _, b in zip(range(n_batches), seq_loader)]
    mlp = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(mlp, {nn.Linear}, dtype=torch.qint8)
    mlp_batches = [(torch.randn(64, 1024),) for _ in range(n_batches)]
    return {"MNIST-1D CNN, batch 256": (cnn, cnn_batches),
            "SeqGRU, batch 256": (SeqGRUClassifier().eval(), seq_batches),
            "MLP 1024-4096-1024 int8 (dynamic), batch 64": (int8, mlp_batches)}


def timer_ms_per_sample(model: nn.Module, batches: list, threads: int, min_run_time: float) -> float:
    """Median time per call from Timer.blocked_autorange, summed over the batches, per sample."""
    total_ms, samples = 0.0, 0
    for batch in batches:
        inputs, _ = split_batch(batch)
        timer = benchmark.Timer(stmt="with torch.inference_mode():\n    call_model(model, inputs)",
                                globals={"torch": torch, "call_model": call_model, "model": model, "inputs": inputs},
                                num_threads=threads)
        total_ms += timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
        samples += batch_size(inputs)
    return total_ms / samples


def state_dict_mb(model: nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def run(rounds: int, n_batches: int, threads: int, min_run_time: float) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    log = Path(tempfile.mkdtemp()) / "computational.txt"
    for name, (model, batches) in cases(n_batches).items():
        ours, theirs, sizes = [], [], []
        for i in range(rounds):  # alternate, so drift on a shared machine hits both alike
            result = eval_computational_metrics(model, batches, log, id=f"{name} {i}", n_batches=n_batches,
                                                num_threads=threads)
            ours.append(result["latency"])
            sizes.append(result["model_size"])
            theirs.append(timer_ms_per_sample(model, batches, threads, min_run_time))
        params_only = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        rows.append({
            "model": name,
            "ours_ms_per_sample": statistics.median(ours),
            "timer_ms_per_sample": statistics.median(theirs),
            "ratio": statistics.median(ours) / statistics.median(theirs),
            "paired_ratio": statistics.median(a / b for a, b in zip(ours, theirs)),
            "cv_ours_pct": 100 * statistics.stdev(ours) / statistics.fmean(ours),
            "cv_timer_pct": 100 * statistics.stdev(theirs) / statistics.fmean(theirs),
            "size_mb": statistics.median(sizes),
            "state_dict_mb": state_dict_mb(model),
            "parameters_only_mb": params_only,
            "ours_all": ours, "timer_all": theirs,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n-batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per Timer.blocked_autorange")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = run(args.rounds, args.n_batches, args.threads, args.min_run_time)
    print(environment(), f"load average {os.getloadavg()[0]:.1f} (1 min) at the end")
    print(markdown(rows, ["model", "ours_ms_per_sample", "timer_ms_per_sample", "ratio", "paired_ratio", "cv_ours_pct",
                          "cv_timer_pct", "size_mb", "state_dict_mb", "parameters_only_mb"]))
    if args.json:
        meta = {"environment": environment(), "load_average_1min": [load_before, os.getloadavg()[0]],
                "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
