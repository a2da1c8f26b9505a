"""Activation-aware (falor) low-rank decomposition of all-MiniLM-L6-v2, no training.

Measures, for several NSR budgets of the global allocation (and ptdeco's per-layer rule read off the
same measurements): the fraction of Linear parameters removed, the mean / min cosine of
mean-pooled sentence embeddings to the original's on real English sentences, and CPU latency
(``--timing-batch`` sentences padded to 128 tokens, ``--threads``, median of interleaved repeats,
side by side in one process). If ``ptdeco`` is installed, its own ``falor.decompose_in_place`` runs on
the same model and calibration data, and the comparison row puts our decomposition at (no more than)
ptdeco's parameter count. Both searches are slow on a loaded CPU: ``--cache`` / ``--ptdeco-cache``
keep them between runs, so one run may search and a later one measure.

``--goals``: the node's newer options side by side with the above. Calibration on every sentence that is
not a test sentence (``--wide-calib-batch`` per batch), ranks from a grid of per-layer cosine losses of
the mean-pooled embedding (``falor_metric='cosine'``, measured on the first ``--cosine-sentences``),
globally allocated to remove at least each goal of Linear params (the smallest budget that does); then
the fits at those ranks: ``projection`` and ``sequential`` (``falor_fit``, damping ``--damping``).
``--cosine-cache`` keeps that grid. ``sequential+gradient`` (``falor_weighting='gradient'``): every layer's
output error weighted by the gradient Gram of the normalised embedding (``--probes`` per batch, on the wide
calibration); its ranks come from a grid measured with the same weighting (``--weighted-cosine-cache``).

    python -m benchmarks.low_rank.minilm --budgets 0.02 0.05 0.1 --per-layer 0.01 --ptdeco-nsr 0.01 \
        --cache /tmp/minilm_grid.pt --ptdeco-cache /tmp/minilm_ptdeco.pt
"""
from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn


from fedcore_adapter.metrics import latency_ms
from fedcore_adapter.nodes.low_rank import allocation as A, falor as F
from fedcore_adapter.nodes.low_rank.calibration import collect_output_covariances
from fedcore_adapter.nodes.low_rank.output_weights import gradient_grams, sqrt_pair
from fedcore_adapter.nodes.low_rank.sequential import sequential_fit
from fedcore_adapter.nodes.low_rank.svd import factorize
from fedcore_adapter.nodes.low_rank.targets import find_layers, make_target, probe_positions
from fedcore_adapter.zoo.text import TextDataModule, english_sentences, load_minilm, load_tokenizer, \
    sentence_embeddings

from benchmarks.common import environment, markdown

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


def latencies(models: dict[str, nn.Module], inputs: dict, repeats: int, threads: int) -> dict[str, float]:
    """Median ms per batch, the variants interleaved round by round so load drifts hit all alike."""
    times = {k: [] for k in models}
    for m in models.values():
        latency_ms(m, inputs, torch.device("cpu"), warmup=1, repeats=1, num_threads=threads)
    for _ in range(repeats):
        for k, m in models.items():
            times[k] += latency_ms(m, inputs, torch.device("cpu"), warmup=0, repeats=1, num_threads=threads)
    return {k: statistics.median(v) for k, v in times.items()}


def run_ptdeco(original: nn.Module, calib: list, nsr: float, cache: str | None,
               include=None, use_mean: bool = False) -> tuple[nn.Module, float]:
    """ptdeco's own falor on a copy of ``original`` (cached as a pickled module: ptdeco's layer structure)."""
    if cache and Path(cache).exists():
        saved = torch.load(cache, weights_only=False)
        return saved["model"], saved["seconds"]
    import ptdeco.falor

    class Wrapped(nn.Module):  # ptdeco feeds one tensor and compares one tensor
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state

    start = time.perf_counter()
    wrapped = Wrapped(copy.deepcopy(original)).eval()
    batches = [b["input_ids"] for b in calib]
    searched = {n for n, _ in find_layers(original, ["linear"], include=include, exclude=EXCLUDE, refactorize=False)}
    blacklist = [f"m.{n}" for n, m in wrapped.m.named_modules() if isinstance(m, nn.Linear) and n not in searched]
    ptdeco.falor.decompose_in_place(
        module=wrapped, device=torch.device("cpu"), data_iterator=itertools.cycle(batches),
        blacklisted_module_names=blacklist, proportion_threshold=1.0, nsr_final_threshold=nsr,
        kl_final_threshold=float("inf"), num_data_steps=len(batches), num_metric_steps=1, use_float64=True,
        use_mean=use_mean, use_damping=False)
    seconds = time.perf_counter() - start
    if cache:
        torch.save({"model": wrapped.m, "seconds": seconds}, cache)
    return wrapped.m, seconds


def searched_grid(original, calib, metric_inputs: list, grid: int, cache: str | None, targets: dict,
                  metric: str = "nsr", centered: bool = False, weights: dict | None = None) -> tuple[dict, float]:
    """Per-layer ``metric`` at ``grid`` ranks for every target, eigenvectors from ``calib``, measured on
    ``metric_inputs`` (cached: the search is the slow part); ``weights``: gradient-weighted projections."""
    if cache and Path(cache).exists():
        saved = torch.load(cache, weights_only=True)
        return ({n: F.FalorResult(n, None, eigvecs=v["eigvecs"], trials=json.loads(v["trials"]))
                 for n, v in saved["results"].items()}, float(saved["seconds"]))
    start = time.perf_counter()
    covs = collect_output_covariances(original, calib, list(targets), centered=centered)
    work = copy.deepcopy(original)
    refs = F.model_outputs(work, metric_inputs, metric)
    search = functools.partial(F.falor_search, model=work, inputs=metric_inputs, references=refs, nsr_threshold=1.0,
                               kl_threshold=None, grid=grid, metric=metric)
    results = {n: search(F.FalorJob(n, covs[n], t.largest_saving_rank(), (weights or {}).get(n)))
               for n, t in targets.items()}
    seconds = time.perf_counter() - start
    if cache:
        torch.save({"seconds": seconds, "results": {n: {"eigvecs": r.eigvecs, "trials": json.dumps(r.trials)}
                                                    for n, r in results.items()}}, cache)
    return results, seconds


def grid_search(original, calib, metric, grid: int, cache: str | None, include=None,
                centered: bool = False) -> tuple[dict, dict, float]:
    """Per-layer NSR at ``grid`` ranks for every Linear, measured on the ``metric`` batches."""
    layers = find_layers(original, ["linear"], include=include, exclude=EXCLUDE, refactorize=False)
    extents = probe_positions(original, calib[0], [n for n, _ in layers])
    targets = {n: make_target(n, m, "channel", extents.get(n, {})) for n, m in layers}
    results, seconds = searched_grid(original, calib, metric, grid, cache, targets, centered=centered)
    return targets, results, seconds


def wide_calibration(dm: TextDataModule, n_test: int, batch: int) -> list[dict]:
    """Every available sentence that is not a test sentence (the slices before the test ones, and those
    after them), as dict batches like the data module's."""
    return sentence_batches(non_test_sentences(dm, n_test), batch)


def non_test_sentences(dm: TextDataModule, n_test: int) -> list[str]:
    """Every sentence ``english_sentences`` can give that is not one of ``dm``'s last ``n_test`` (its test ones)."""
    n_before = len(dm.sentences) - n_test
    pool = _all_sentences(dm.seed)
    assert pool[:len(dm.sentences)] == dm.sentences  # same sampling prefix: the test slice is the same
    return dm.sentences[:n_before] + pool[len(dm.sentences):]


def sentence_batches(sentences: list[str], batch: int) -> list[dict]:
    """``sentences`` in order, as dict batches of ``batch`` padded to their longest (at most 128 tokens)."""
    tok = load_tokenizer()
    return [dict(tok(sentences[i:i + batch], padding="longest", truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(sentences), batch)]


def _all_sentences(seed: int) -> list[str]:
    """All sentences english_sentences can give, in its sampling order."""
    n = 1
    while True:
        try:
            english_sentences(n * 2, seed)
            n *= 2
        except ValueError:
            break
    lo, hi = n, 2 * n  # largest n that works, by bisection
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            english_sentences(mid, seed)
            lo = mid
        except ValueError:
            hi = mid
    return english_sentences(lo, seed)


def cosine_grid(original, calib, metric_sentences: int, grid: int, cache: str | None, targets: dict,
                weights: dict | None = None):
    """Eigenvectors from the (wide) calibration and per-layer cosine losses at ``grid`` ranks on its first
    ``metric_sentences`` (cached); ``weights``: each layer projected in its gradient-weighted norm
    (``falor_weighting='gradient'``)."""
    metric, n = [], 0
    for b in calib:
        if n >= metric_sentences:
            break
        metric.append(b)
        n += b["input_ids"].shape[0]
    return searched_grid(original, calib, metric, grid, cache, targets, metric="cosine", weights=weights)


def build_sequential(original: nn.Module, calib: list, ranks: dict, damping: float,
                     weights: dict | None = None, refit_kept: bool = False) -> nn.Module:
    """The sequential fit at ``ranks``; ``weights``: per layer ``(R, R^-1)`` (``falor_weighting='gradient'``);
    ``refit_kept``: the layers of ``ranks`` left whole (rank None) refitted too (``falor_refit_kept``)."""
    model = copy.deepcopy(original)
    chosen = {n: r for n, r in ranks.items() if r}

    def put(name, a, b, bias):
        _replace(model, name, factorize(original.get_submodule(name), "channel", a, b, bias.float()))

    sequential_fit(original, model, chosen, calib, damping, put, weights,
                   refit=[n for n, r in ranks.items() if not r] if refit_kept else ())
    return model


def goal_ranks(results: list, params_at: dict, params_now: dict, base_linear: int, goal: float) -> dict:
    """The node's falor ``budget`` allocation: the least summed cosine loss removing ``goal`` of the Linear
    params (the last greedy move shortened to meet it, its rank possibly between two measured ones)."""
    ranks, _ = A.allocate_to_saving(results, params_at, params_now, goal * base_linear, "cosine_loss")
    return ranks


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
    parser.add_argument("--removal", type=float, nargs="*", default=[],
                        help="also: the smallest NSR budget removing at least this fraction of Linear params")
    parser.add_argument("--per-layer", type=float, nargs="*", default=[0.01], help="ptdeco's rule on the grid")
    parser.add_argument("--ptdeco-nsr", type=float, default=None, help="run ptdeco's falor at this NSR")
    parser.add_argument("--ptdeco-calib", choices=["validation", "wide"], default="validation",
                        help="ptdeco's calibration: the validation batches (as the NSR grid) or the wide set "
                             "(as the cosine grid and the sequential fit; needs --goals)")
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--calib-batch", type=int, default=16, help="sentences per calibration batch")
    parser.add_argument("--calib-batches", type=int, default=4, help="batches for covariances (NSR: the first)")
    parser.add_argument("--test-sentences", type=int, default=256)
    parser.add_argument("--attn", default="sdpa", help="attention implementation of every model (eager, sdpa)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-batch", type=int, default=32, help="sentences x 128 tokens per timed batch")
    parser.add_argument("--no-measure", action="store_true", help="search (and cache) only")
    parser.add_argument("--cache", type=str, default=None, help="file keeping the grid search between runs")
    parser.add_argument("--ptdeco-cache", type=str, default=None, help="file keeping ptdeco's result between runs")
    parser.add_argument("--statistic", choices=["second_moment", "covariance"], default="second_moment",
                        help="falor_statistic of ours; ptdeco gets the same (its use_mean)")
    parser.add_argument("--include", nargs="*", default=None, help="shell patterns of Linear layers (default: all)")
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--goals", type=float, nargs="*", default=[],
                        help="newer options: Linear-param removal goals (wide calibration, cosine grid, both fits)")
    parser.add_argument("--wide-calib-batch", type=int, default=16)
    parser.add_argument("--cosine-sentences", type=int, default=48, help="cosine grid: calibration sentences")
    parser.add_argument("--cosine-grid", type=int, default=10, help="cosine grid: ranks per layer")
    parser.add_argument("--cosine-cache", type=str, default=None)
    parser.add_argument("--damping", type=float, default=0.1, help="sequential fit: falor_damping")
    parser.add_argument("--fits", nargs="+", default=["projection", "sequential"],
                        choices=["projection", "sequential", "sequential+gradient", "sequential+gradient+refit"],
                        help="falor_fit, and sequential+gradient: falor_weighting='gradient'; +refit: "
                             "falor_refit_kept")
    parser.add_argument("--probes", type=int, default=8, help="sequential+gradient: falor_probes")
    parser.add_argument("--weighted-cosine-cache", type=str, default=None,
                        help="sequential+gradient: file keeping the weighted cosine grid between runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    original = load_minilm(args.attn)
    n_val = args.calib_batch * args.calib_batches
    dm = TextDataModule(n_train=32, n_val=n_val, n_test=args.test_sentences, batch_size=args.calib_batch,
                        pad_to_max_length=False)
    calib = list(dm.val_dataloader())  # covariances
    metric = calib[:1]  # NSR measured on the first calibration batch
    test = dm.test_dataloader()  # other sentences: cosine
    targets, results, search_s = grid_search(original, calib, metric, args.grid, args.cache, args.include,
                                           args.statistic == "covariance")
    print(f"grid search: {search_s:.0f} s", flush=True)
    wide, cos_results, cos_s = None, None, 0.0
    if args.goals:
        wide = wide_calibration(dm, args.test_sentences, args.wide_calib_batch)
        cos_results, cos_s = cosine_grid(original, wide, args.cosine_sentences, args.cosine_grid, args.cosine_cache,
                                         targets)
        print(f"cosine grid: {cos_s:.0f} s on {sum(b['input_ids'].shape[0] for b in wide)} calibration sentences",
              flush=True)
    weights, weighted_results, weighted_s = None, None, 0.0
    if args.goals and any(f.startswith("sequential+gradient") for f in args.fits):
        start = time.perf_counter()
        grams = gradient_grams(original, wide, list(targets), "cosine", args.probes)
        weights = {n: sqrt_pair(g) for n, g in grams.items()}
        grams_s = time.perf_counter() - start
        weighted_results, weighted_s = cosine_grid(original, wide, args.cosine_sentences, args.cosine_grid,
                                                   args.weighted_cosine_cache, targets, weights)
        print(f"gradient weights: {grams_s:.0f} s ({args.probes} probes per batch); weighted cosine grid: "
              f"{weighted_s:.0f} s", flush=True)
    theirs, ptdeco_s = None, 0.0
    if args.ptdeco_nsr is not None:
        try:
            ptdeco_calib = wide if args.ptdeco_calib == "wide" else calib
            if ptdeco_calib is None:
                parser.error("--ptdeco-calib wide needs --goals (the wide calibration set)")
            theirs, ptdeco_s = run_ptdeco(original, ptdeco_calib, args.ptdeco_nsr, args.ptdeco_cache, args.include,
                                          use_mean=args.statistic == "covariance")
            print(f"ptdeco falor: {ptdeco_s:.0f} s", flush=True)
        except ImportError:
            print("ptdeco is not installed: no comparison row")
    if args.no_measure:
        return
    params_at = {n: t.params_at for n, t in targets.items()}
    params_now = {n: t.params for n, t in targets.items()}
    base_linear = linear_params(original)

    variants: dict[str, nn.Module] = {"original": original}
    for budget in args.budgets:
        ranks = A.allocate_nsr(list(results.values()), params_at, params_now, budget, None)
        variants[f"falor global, sum NSR < {budget}"] = build(original, results, ranks)
    others = base_linear - sum(params_now.values())  # Linear params outside the search (the pooler)
    scan = [round(0.001 * 1.1 ** i, 5) for i in range(120)]

    def removed(ranks: dict) -> float:
        return 1 - (others + sum(params_at[n](r) if r else params_now[n] for n, r in ranks.items())) / base_linear

    for goal in args.removal:
        for budget in scan:
            ranks = A.allocate_nsr(list(results.values()), params_at, params_now, budget, None)
            if removed(ranks) >= goal:
                variants[f"falor global >= {goal:.0%} removed (sum NSR < {budget})"] = build(original, results, ranks)
                break
    for nsr in args.per_layer:
        variants[f"falor per-layer NSR < {nsr}"] = build(original, results, per_layer_rule(results, nsr))
    for goal in args.goals:
        for fit in args.fits:
            weighted = fit.startswith("sequential+gradient")
            grid_results = weighted_results if weighted else cos_results
            ranks = goal_ranks(list(grid_results.values()), params_at, params_now, base_linear, goal)
            grid_name = "weighted cosine grid" if weighted else "cosine grid"
            label = f"wide calib, {grid_name}, budget {goal:.0%} of Linear params, {fit}"
            t0 = time.perf_counter()
            variants[label] = build(original, cos_results, ranks) if fit == "projection" else \
                build_sequential(original, wide, ranks, args.damping, weights if weighted else None,
                                 refit_kept=fit.endswith("+refit"))
            print(f"{label}: built in {time.perf_counter() - t0:.0f} s", flush=True)
    if theirs is not None:
        variants[f"ptdeco falor NSR < {args.ptdeco_nsr} ({args.ptdeco_calib} calibration)"] = theirs
        target = linear_params(theirs)
        for budget in scan:  # the smallest budget within ptdeco's params
            ranks = A.allocate_nsr(list(results.values()), params_at, params_now, budget, None)
            if 1 - removed(ranks) <= target / base_linear:
                variants[f"falor global at ptdeco's params (sum NSR < {budget})"] = build(original, results, ranks)
                break
    reference = sentence_embeddings(original, test)
    rows = []
    for name, model in variants.items():
        cos = torch.nn.functional.cosine_similarity(reference, sentence_embeddings(model, test), dim=1)
        rows.append({"variant": name, "linear_params_removed": 1 - linear_params(model) / base_linear,
                     "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                     "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())})
        print(rows[-1], flush=True)
    tok = load_tokenizer()
    timing_inputs = dict(tok(dm.sentences[:args.timing_batch], padding="max_length", truncation=True, max_length=128,
                             return_tensors="pt"))
    lat = latencies(variants, timing_inputs, args.repeats, args.threads)
    for row in rows:
        row["latency_ms"] = lat[row["variant"]]
        row["speedup"] = lat["original"] / lat[row["variant"]]
    print(environment())
    if args.goals:
        print(f"wide calibration: {sum(b['input_ids'].shape[0] for b in wide)} sentences (none of the test ones); "
              f"cosine grid {args.cosine_grid} ranks x {len(targets)} layers on {args.cosine_sentences} of them in "
              f"{cos_s:.0f} s; sequential damping {args.damping}")
    print(f"attention {args.attn}; statistic {args.statistic}; falor grid search: {len(targets)} Linear layers x "
          f"{args.grid} ranks in {search_s:.0f} s"
          f"{f'; ptdeco falor {ptdeco_s:.0f} s' if theirs is not None else ''} (covariance: {args.calib_batches} x "
          f"{args.calib_batch} validation sentences, NSR on the first {args.calib_batch}; cosine: "
          f"{args.test_sentences} test sentences; latency: {args.timing_batch} x 128 tokens, {args.threads} threads, "
          f"median of {args.repeats} interleaved repeats); this run {time.perf_counter() - t_start:.0f} s")
    print(markdown(rows, list(rows[0])))
    ok = [r for r in rows if r["linear_params_removed"] >= 0.25 and r["mean_cosine"] >= 0.98]
    print("target (>= 25% of Linear params removed at mean cosine >= 0.98) met by: "
          + (", ".join(f"{r['variant']} (speed-up {r['speedup']:.2f})" for r in ok) or "none"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
