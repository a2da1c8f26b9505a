"""All six named setups on MNIST-1D from one command: final accuracy, params, MACs, size, latency,
throughput and wall time, each as a ratio to RAW.

RAW trains the model from scratch (100 epochs). Every compression setup then starts from the
RAW-trained model (`pretrained=`), as FedCore's `need_pretrain=False` setups expect, and runs its
exact chain (training, pruning, low-rank, quantization nodes with the setup's own epochs).

    python benchmarks/composite_setups.py [--setups RAW TEST COMPOSITE_1 COMPOSITE_2 QAT_1 PTQ_1] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown  # noqa: E402

from fedcore_adapter.jobs import run_from_config  # noqa: E402

BASE = {"tracking": {"name": "none"}, "model": {"_target_": "fedcore_adapter.zoo.models.MNIST1DCNN"},
        "data": {"_target_": "fedcore_adapter.zoo.datamodules.MNIST1DDataModule"}}
COLUMNS = ["accuracy", "params", "macs", "size_mb", "latency_ms", "throughput_sps"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setups", nargs="+", default=["RAW", "TEST", "COMPOSITE_1", "COMPOSITE_2", "QAT_1", "PTQ_1"])
    parser.add_argument("--out", default="composition_results/benchmark_mnist1d")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    raw_dir = None
    for name in ["RAW"] + [s for s in args.setups if s.upper() != "RAW"]:
        cfg = {**BASE, "setup": name, "output_dir": str(out), "common": {"seed": args.seed}}
        if name.upper() != "RAW":
            cfg["pretrained"] = str(raw_dir)
        start = time.perf_counter()
        result = run_from_config(cfg)
        wall = time.perf_counter() - start
        if name.upper() == "RAW":
            raw_dir = result.output_dir
        final = result.metrics[-1]
        rows.append({"setup": name.upper(), "chain": " → ".join(r["kind"] for r in result.metrics[1:]),
                     **{c: final[c] for c in COLUMNS}, "dtype": final["dtype"], "wall_s": wall})
    raw = rows[0]
    table = []
    for r in rows:
        t = {"setup": r["setup"], "accuracy": f"{r['accuracy']:.4f} ({100 * (r['accuracy'] - raw['accuracy']):+.1f} pt)"}
        for c in COLUMNS[1:]:
            ratio = raw[c] / r[c] if c != "throughput_sps" else r[c] / raw[c]
            t[c] = f"{r[c]:.4g} ({ratio:.2f}x)"
        t["dtype"], t["wall_s"] = r["dtype"], f"{r['wall_s']:.0f}"
        table.append(t)
    print(environment())
    print("ratios: params/MACs/size/latency as RAW ÷ setup (higher = smaller/faster); throughput as setup ÷ RAW")
    print(markdown(table, list(table[0])))
    (out / "benchmark.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
