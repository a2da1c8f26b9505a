"""Activation-aware (falor) low-rank decomposition of all-MiniLM-L6-v2, no training.

Measures, for several NSR budgets of the global allocation (and ptdeco's per-layer rule read off the
same measurements): the fraction of Linear parameters removed, the mean / min cosine of
mean-pooled sentence embeddings to the original's on real English sentences, and CPU latency
(batch 32 x 128 tokens, 2 threads, median of interleaved repeats, side by side in one process).
If ``ptdeco`` is installed, its own ``falor.decompose_in_place`` runs on the same model and data,
and the comparison row puts our decomposition at (no more than) ptdeco's parameter count.

    python benchmarks/low_rank_minilm.py --budgets 0.02 0.05 0.1 --per-layer 0.01 --ptdeco-nsr 0.01 --cache /tmp/minilm_grid.pt
"""
from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown  # noqa: E402

from fedcore_adapter.metrics import latency_ms  # noqa: E402
from fedcore_adapter.nodes.low_rank import falor as F  # noqa: E402
from fedcore_adapter.nodes.low_rank.calibration import collect_output_covariances  # noqa: E402
from fedcore_adapter.nodes.low_rank.svd import factorize  # noqa: E402
from fedcore_adapter.nodes.low_rank.targets import find_layers, make_target, probe_positions  # noqa: E402
from fedcore_adapter.zoo.text import TextDataModule, embedding_cosine, load_minilm, load_tokenizer  # noqa: E402

EXCLUDE = ["pooler.*"]  # the pooler does not feed mean-pooled sentence embeddings: left as it is


def linear_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def build(original: nn.Module, results: dict, ranks: dict) -> nn.Module:
    model = copy.deepcopy(original)
    for name, rank in ranks.items():
        if rank is not None:
            layer = model.get_submodule(name)
            a, b = F.falor_factors(layer, results[name].eigvecs[:, :rank])
            _replace(model, name, factorize(layer, "channel", a, b))
    return model


def latencies(models: dict[str, nn.Module], inputs: dict, repeats: int) -> dict[str, float]:
    """Median ms per batch, the variants interleaved round by round so load drifts hit all alike."""
    times = {k: [] for k in models}
    for m in models.values():
        latency_ms(m, inputs, torch.device("cpu"), warmup=2, repeats=1, num_threads=2)
    for _ in range(repeats):
        for k, m in models.items():
            times[k] += latency_ms(m, inputs, torch.device("cpu"), warmup=0, repeats=1, num_threads=2)
    return {k: statistics.median(v) for k, v in times.items()}


def run_ptdeco(original: nn.Module, calib: list, nsr: float) -> nn.Module:
    import ptdeco.falor

    class Wrapped(nn.Module):  # ptdeco feeds one tensor and compares one tensor
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state

    wrapped = Wrapped(copy.deepcopy(original)).eval()
    batches = [b["input_ids"] for b in calib]
    blacklist = [f"m.{n}" for n, m in wrapped.m.named_modules() if n.startswith("pooler")]
    ptdeco.falor.decompose_in_place(
        module=wrapped, device=torch.device("cpu"), data_iterator=itertools.cycle(batches),
        blacklisted_module_names=blacklist, proportion_threshold=1.0, nsr_final_threshold=nsr,
        kl_final_threshold=float("inf"), num_data_steps=len(batches), num_metric_steps=1, use_float64=True,
        use_mean=True, use_damping=False)
    return wrapped.m


def grid_search(original, calib, metric, grid: int, cache: str | None) -> tuple[dict, dict, float]:
    """Per-layer NSR at ``grid`` ranks for every Linear (cached: the search is the slow part)."""
    layers = find_layers(original, ["linear"], exclude=EXCLUDE, refactorize=False)
    extents = probe_positions(original, calib[0], [n for n, _ in layers])
    targets = {n: make_target(n, m, "channel", extents.get(n, {})) for n, m in layers}
    if cache and Path(cache).exists():
        saved = torch.load(cache, weights_only=True)
        results = {n: F.FalorResult(n, None, eigvecs=v["eigvecs"], trials=json.loads(v["trials"]))
                   for n, v in saved["results"].items()}
        return targets, results, float(saved["seconds"])
    start = time.perf_counter()
    covs = collect_output_covariances(original, calib, list(targets))
    work = copy.deepcopy(original)
    refs = F.model_rows(work, metric)
    search = functools.partial(F.falor_search, model=work, inputs=metric, references=refs, nsr_threshold=1.0,
                               kl_threshold=None, grid=grid)
    results = {n: search(F.FalorJob(n, covs[n], t.largest_saving_rank())) for n, t in targets.items()}
    seconds = time.perf_counter() - start
    if cache:
        torch.save({"seconds": seconds, "results": {n: {"eigvecs": r.eigvecs, "trials": json.dumps(r.trials)}
                                                    for n, r in results.items()}}, cache)
    return targets, results, seconds


def per_layer_rule(results: dict, nsr: float) -> dict:
    """ptdeco's rule read off the grid: each layer at its smallest measured rank with NSR under ``nsr``."""
    ranks = {}
    for name, res in results.items():
        ok = [t["rank"] for t in res.trials if t["nsr"] < nsr]
        ranks[name] = min(ok) if ok else None
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--per-layer", type=float, nargs="*", default=[0.01], help="ptdeco's rule on the grid")
    parser.add_argument("--ptdeco-nsr", type=float, default=None, help="run ptdeco's falor at this NSR")
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cache", type=str, default=None, help="file keeping the grid search between runs")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    original = load_minilm()
    dm = TextDataModule(n_train=32, n_val=64, n_test=256, batch_size=16, pad_to_max_length=False)
    calib = list(dm.val_dataloader())  # 4 batches of 16 validation sentences: covariances
    metric = calib[:1]  # NSR measured on the first of them
    test = dm.test_dataloader()  # 256 other sentences: cosine
    tok = load_tokenizer()
    timing_inputs = dict(tok(dm.sentences[:32], padding="max_length", truncation=True, max_length=128,
                             return_tensors="pt"))
    targets, results, search_s = grid_search(original, calib, metric, args.grid, args.cache)
    params_at = {n: t.params_at for n, t in targets.items()}
    params_now = {n: t.params for n, t in targets.items()}
    base_linear = linear_params(original)

    variants: dict[str, nn.Module] = {"original": original}
    for budget in args.budgets:
        ranks = F.allocate_nsr(list(results.values()), params_at, params_now, budget, None)
        variants[f"falor global, sum NSR < {budget}"] = build(original, results, ranks)
    for nsr in args.per_layer:
        variants[f"falor per-layer NSR < {nsr}"] = build(original, results, per_layer_rule(results, nsr))
    note = ""
    if args.ptdeco_nsr is not None:
        try:
            start = time.perf_counter()
            theirs = run_ptdeco(original, calib, args.ptdeco_nsr)
            note = f"ptdeco falor took {time.perf_counter() - start:.0f} s"
            variants[f"ptdeco falor NSR < {args.ptdeco_nsr}"] = theirs
            target = linear_params(theirs)
            for budget in [round(0.001 * 1.15 ** i, 5) for i in range(80)]:  # smallest budget reaching it
                ranks = F.allocate_nsr(list(results.values()), params_at, params_now, budget, None)
                ours = build(original, results, ranks)
                if linear_params(ours) <= target:
                    variants[f"falor global at ptdeco's params (sum NSR < {budget})"] = ours
                    break
        except ImportError:
            note = "ptdeco is not installed: no comparison row"
    lat = latencies(variants, timing_inputs, args.repeats)
    rows = []
    for name, model in variants.items():
        cos = embedding_cosine(original, model, test)
        rows.append({"variant": name, "linear_params_removed": 1 - linear_params(model) / base_linear,
                     "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                     "mean_cosine": cos["mean_cosine"], "min_cosine": cos["min_cosine"],
                     "latency_ms": lat[name], "speedup": lat["original"] / lat[name]})
    print(environment())
    print(f"falor grid search: {len(targets)} Linear layers x {args.grid} ranks in {search_s:.0f} s "
          f"(covariance: 4 x 16 validation sentences, NSR on the first 16; cosine: 256 test sentences; "
          f"latency: 32 x 128 tokens, {args.repeats} interleaved repeats). {note}")
    print(markdown(rows, list(rows[0])))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
