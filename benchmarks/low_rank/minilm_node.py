"""The falor ``low_rank`` node on all-MiniLM-L6-v2 through the engine (``run_setup``), as a user runs it.

One setup with one node: ``method: falor``, the cosine rank search, the gradient-weighted sequential fit with
the kept layers refitted, and a params ``budget`` removing ``--goal`` of the Linear params (the pooler is
left out, as in ``low_rank_minilm.py``). Calibration: every sentence that is not a test sentence (the same
batches as ``low_rank_minilm.py --goals``); the grid's cosine is measured on the first ``--metric-batches``
of them. Printed: the node's wall time, Linear params removed, mean / min cosine of the 256 test sentences'
embeddings to the original's, and latency against the original side by side.

    python -m benchmarks.low_rank.minilm_node --goal 0.25 --damping 1.0
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from fedcore_adapter import run_setup
from fedcore_adapter.metrics import count_params
from fedcore_adapter.zoo.text import TextDataModule, load_minilm, load_tokenizer, sentence_embeddings

from benchmarks.common import environment, markdown
from benchmarks.low_rank.minilm import EXCLUDE, latencies, linear_params, wide_calibration


class Sentences:
    """The node's data: calibration batches as validation (and training) data, the test sentences as test."""

    def __init__(self, calibration: list, test):
        self.calibration, self.test = calibration, test

    def train_dataloader(self):
        return self.calibration

    def val_dataloader(self):
        return self.calibration

    def test_dataloader(self):
        return self.test


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--goal", type=float, default=0.25, help="fraction of Linear params removed")
    parser.add_argument("--damping", type=float, default=1.0, help="falor_damping")
    parser.add_argument("--refit-kept", choices=["true", "false"], default="true", help="falor_refit_kept")
    parser.add_argument("--metric-batches", type=int, default=3, help="16-sentence batches the grid is measured on")
    parser.add_argument("--grid-points", type=int, default=10)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timing-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    original = load_minilm("sdpa")
    dm = TextDataModule(n_train=32, n_val=64, n_test=256, batch_size=8, pad_to_max_length=False)
    wide = wide_calibration(dm, 256, 16)
    base = linear_params(original)
    node = {"kind": "low_rank", "method": "falor", "layer_types": ["linear"], "exclude": EXCLUDE,
            "allocation": "global", "falor_metric": "cosine", "grid_points": args.grid_points,
            "metric_batches": args.metric_batches, "calibration_batches": len(wide),
            "falor_fit": "sequential", "falor_weighting": "gradient", "falor_probes": args.probes,
            "falor_damping": args.damping, "falor_refit_kept": args.refit_kept == "true",
            "budget": {"metric": "params", "value": int(count_params(original) - args.goal * base)}}
    setup = {"name": "minilm_falor", "common": {"measure": False, "num_threads": args.threads}, "nodes": [node]}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = run_setup(setup, original, Sentences(wide, dm.test_dataloader()), output_dir=out)
        seconds = time.perf_counter() - start
        meta = json.loads((result.output_dir / "nodes" / "1_low_rank" / "decompose_config.json").read_text())["meta"]
    original = load_minilm("sdpa")  # the engine worked on the model it was given
    reference = sentence_embeddings(original, dm.test_dataloader())
    cos = torch.nn.functional.cosine_similarity(reference, sentence_embeddings(result.model, dm.test_dataloader()),
                                                dim=1)
    tok = load_tokenizer()
    timing = dict(tok(dm.sentences[:args.timing_batch], padding="max_length", truncation=True, max_length=128,
                      return_tensors="pt"))
    lat = latencies({"original": original, "node": result.model}, timing, args.repeats, args.threads)
    row = {"node": json.dumps({k: v for k, v in node.items() if k.startswith("falor_") or k == "budget"}),
           "node_s": round(seconds), "layers_replaced": meta["layers_replaced"], "refit_kept": len(meta["refit_kept"]),
           "linear_params_removed": round(1 - linear_params(result.model) / base, 4),
           "mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 4),
           "latency_ms": round(lat["node"], 1), "original_ms": round(lat["original"], 1),
           "speedup": round(lat["original"] / lat["node"], 3)}
    print(environment())
    print(markdown([row], list(row)))


if __name__ == "__main__":
    main()
