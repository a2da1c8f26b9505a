"""Choosing the sequential falor fit's options for all-MiniLM-L6-v2 on a validation split, not on the test sentences.

The wide calibration of ``low_rank_minilm.py --goals`` (every sentence that is not a test sentence) is split:
its last ``--val-batches`` batches are held out for validation, the rest calibrate. On the calibration part:
the gradient weights (``falor_weighting='gradient'``), the weighted cosine grid and the ``budget`` allocation
removing ``--goal`` of the Linear params; then the sequential fit for every ``falor_damping`` in ``--damping``,
with and without ``falor_refit_kept``. Each is scored by the mean / min cosine of the validation sentences'
embeddings to the original's. The 256 test sentences are not loaded.

    python -m benchmarks.studies.low_rank_minilm_select --damping 0.1 0.3 1 3 --grid-cache /tmp/minilm_select_grid.pt
"""
from __future__ import annotations

import argparse
import time

import torch

from fedcore_adapter.nodes.low_rank.output_weights import gradient_grams, sqrt_pair
from fedcore_adapter.nodes.low_rank.targets import find_layers, make_target
from fedcore_adapter.zoo.text import TextDataModule, load_minilm, sentence_embeddings

from benchmarks.common import environment, markdown
from benchmarks.low_rank.minilm import EXCLUDE, build_sequential, cosine_grid, goal_ranks, linear_params, \
    wide_calibration

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--damping", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--goal", type=float, default=0.25, help="fraction of Linear params removed")
    parser.add_argument("--val-batches", type=int, default=6, help="calibration batches held out for validation")
    parser.add_argument("--wide-calib-batch", type=int, default=16)
    parser.add_argument("--test-sentences", type=int, default=256, help="only to leave the same sentences out")
    parser.add_argument("--cosine-sentences", type=int, default=48)
    parser.add_argument("--cosine-grid", type=int, default=10)
    parser.add_argument("--grid-cache", type=str, default=None, help="file keeping the weighted grid between runs")
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    original = load_minilm("sdpa")
    dm = TextDataModule(n_train=32, n_val=64, n_test=args.test_sentences, batch_size=8, pad_to_max_length=False)
    wide = wide_calibration(dm, args.test_sentences, args.wide_calib_batch)
    calib, validation = wide[:-args.val_batches], wide[-args.val_batches:]
    n_calib, n_val = (sum(b["input_ids"].shape[0] for b in part) for part in (calib, validation))
    layers = find_layers(original, ["linear"], exclude=EXCLUDE, refactorize=False)
    targets = {n: make_target(n, m, "channel", {}) for n, m in layers}
    grams = gradient_grams(original, calib, list(targets), "cosine", args.probes)
    weights = {n: sqrt_pair(g) for n, g in grams.items()}
    results, grid_s = cosine_grid(original, calib, args.cosine_sentences, args.cosine_grid, args.grid_cache, targets,
                                  weights)
    base = linear_params(original)
    ranks = goal_ranks(list(results.values()), {n: t.params_at for n, t in targets.items()},
                       {n: t.params for n, t in targets.items()}, base, args.goal)
    reference = sentence_embeddings(original, validation)
    rows = []
    for damping in args.damping:
        for refit in (False, True):
            model = build_sequential(original, calib, ranks, damping, weights, refit_kept=refit)
            cos = torch.nn.functional.cosine_similarity(reference, sentence_embeddings(model, validation), dim=1)
            rows.append({"falor_damping": damping, "falor_refit_kept": refit,
                         "linear_params_removed": round(1 - linear_params(model) / base, 4),
                         "val_mean_cosine": round(float(cos.mean()), 5), "val_min_cosine": round(float(cos.min()), 4)})
            print(rows[-1], flush=True)
    print(environment())
    print(f"calibration {n_calib} sentences, validation {n_val} (held out of the wide calibration; no test "
          f"sentence); weighted grid {grid_s:.0f} s; this run {time.perf_counter() - start:.0f} s")
    print(markdown(rows, list(rows[0])))
    best = max(rows, key=lambda r: r["val_mean_cosine"])
    print(f"chosen on validation: falor_damping={best['falor_damping']} falor_refit_kept={best['falor_refit_kept']}")


if __name__ == "__main__":
    main()
