"""A ptls GRU encoder on generated transactions: RAW, PTQ_1, COMPOSITE_2 and hidden-unit pruning side by side.

    python -m benchmarks.ptls.end_to_end [--clients 2000] [--hidden 256] [--epochs 40] [--finetune-epochs N]
                                         [--prune-finetune-epochs 20] [--patience 4] [--limit-batches N]
                                         [--rounds 3] [--threads 1] [--reuse DIR] [--setups ...]

The model is a real pytorch-lifestream ``SequenceToTarget``: ``TrxEncoder`` (an mcc embedding,
a transaction-type embedding, log amounts) -> GRU (``--hidden`` units) -> linear head, with a
torchmetrics accuracy; the data a ``PtlsDataModule`` of ``(PaddedBatch, class)`` batches over
``--clients`` generated clients of 50-300 events (70 % train, 10 % valid, 20 % test).

Every model comes out of ``fedcore_fit`` with the training budget a user would give it: full
epochs (``--limit-batches`` cuts them, for a smoke run): PTQ_1 and COMPOSITE_2 run every epoch count
FedCore defines for them (``--finetune-epochs`` cuts their fine-tunes, early-stopped, and their low-rank
training to one epoch); RAW trains at most ``--epochs`` and PRUNE_0.5 (one ``pruning`` node at ratio 0.5:
GRU hidden units, then its fine-tune) at most ``--prune-finetune-epochs``, both stopping after
``--patience`` epochs without a lower validation loss and keeping their best epoch (``keep_best: true``).
PTQ_1, COMPOSITE_2 and PRUNE_0.5 start from RAW's model with their own training node skipped. Every
node's validation accuracy per epoch is printed. A setup that fails is reported
with its one-line error. Per model: params and bytes from the engine's rows; latency at batch 1
and 64 re-measured side by side (models interleaved in every round, median over ``--rounds``,
``--threads`` threads); downstream quality on the test clients: the classifier's accuracy and a
logistic regression on the encoder's embeddings (5-fold cross-validated).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from fedcore_adapter import fedcore_fit, load_model
from fedcore_adapter.hooks import Hook
from fedcore_adapter.metrics import latency_ms
from fedcore_adapter.zoo import lifestream

from benchmarks.common import environment, markdown


def setups(args) -> dict[str, tuple[object, dict]]:
    """name -> (setup, overrides) of every compressed model (all start from RAW's trained model)."""
    stop = {"early_stopping": {"monitor": "val_loss", "patience": args.patience}, "keep_best": True}
    skip = {"training": {"epochs": 0}}
    named = {"PTQ_1": {**skip}, "COMPOSITE_2": {**skip}}  # every other epoch count as FedCore defines it
    if args.finetune_epochs is not None:  # cut: one low-rank training epoch, fine-tunes early-stopped
        fine = {"epochs": args.finetune_epochs, "learning_rate": 1e-3, **stop}
        low_rank = {"method": {"epochs": 1}, "finetune_params": fine}
        named = {"PTQ_1": {**skip, "low_rank": low_rank},
                 "COMPOSITE_2": {**skip, "1": low_rank, "2": {"epochs": 1, "finetune_params": fine}, "3": low_rank}}
    prune_fine = {"epochs": args.prune_finetune_epochs, "learning_rate": 1e-3, **stop}
    return {
        "PTQ_1": ("PTQ_1", {"nodes": named["PTQ_1"]}),
        "COMPOSITE_2": ("COMPOSITE_2", {"nodes": named["COMPOSITE_2"]}),
        "PRUNE_0.5": ({"name": "PRUNE_0.5", "nodes": [{"kind": "pruning", "pruning_ratio": 0.5, "epochs": 0,
                                                       "finetune_params": prune_fine}]}, {}),
    }


class Curves(Hook):
    """Every node's per-epoch training rows (``train_loss``, ``val_loss``, ``val_accuracy``), by node."""

    def __init__(self):
        self.rows: dict[str, list[dict]] = {}

    def on_log(self, run, index, node, metrics, step) -> None:
        self.rows.setdefault(f"{index}:{getattr(node, 'kind', node)}", []).append({"epoch": step, **metrics})


def summary(curves: Curves) -> str:
    """One line per node: epochs run and the validation accuracy of each."""
    lines = []
    for node, rows in curves.rows.items():
        keys = sorted({k for r in rows for k in r if k.endswith("val_accuracy")})  # fine-tunes prefix their keys
        for key in keys:
            accuracy = " ".join(f"{r[key]:.3f}" for r in rows if r.get(key) is not None)
            lines.append(f"  {node}: {key} per epoch {accuracy}")
        if not keys:
            lines.append(f"  {node}: {len(rows)} epoch rows, no validation accuracy")
    return "\n".join(lines)


def reuse(folder: Path, build) -> Optional[tuple]:
    """``(model, metrics rows)`` of a completed run folder, the model rebuilt with ``load_model``; else None."""
    if not (folder / "final").is_dir():
        return None
    return load_model(folder / "final", build()), json.loads((folder / "metrics.json").read_text())


def downstream(model, loader) -> tuple[float, float]:
    """(classifier accuracy, logistic-regression accuracy on the encoder's embeddings) on ``loader``, in one pass."""
    embeddings, predictions, targets = [], [], []
    model.eval()
    with torch.inference_mode():
        for x, y in loader:
            embedding = model.seq_encoder(x)
            embeddings.append(embedding.float())
            predictions.append(model.head(embedding).argmax(-1))
            targets.append(y)
    target = torch.cat(targets)
    accuracy = float((torch.cat(predictions) == target).float().mean())
    return accuracy, lifestream.downstream_accuracy(torch.cat(embeddings).numpy(), target.numpy())


def side_by_side(models: dict, batches: dict, rounds: int, threads: int) -> dict:
    """Median over rounds of each model's median latency per batch size; models interleaved in every round."""
    times = {(name, b): [] for name in models for b in batches}
    for _ in range(rounds):
        for name, model in models.items():
            for b, batch in batches.items():
                times[name, b].append(statistics.median(latency_ms(model.eval(), batch, torch.device("cpu"),
                                                                   warmup=1, repeats=3, num_threads=threads)))
    return {key: statistics.median(v) for key, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=40, help="RAW's most epochs")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="cut PTQ_1's and COMPOSITE_2's fine-tunes to this many epochs (early-stopped) and their "
                             "low-rank training to one; default: their epochs as FedCore defines them")
    parser.add_argument("--prune-finetune-epochs", type=int, default=20, help="most epochs of PRUNE_0.5's fine-tune")
    parser.add_argument("--patience", type=int, default=4, help="early stopping: epochs without a lower "
                                                                  "validation loss")
    parser.add_argument("--limit-batches", type=int, default=None, help="cut every epoch (smoke runs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", help="results folder of an earlier run: its completed models are reloaded "
                                        "(load_model onto a freshly built one), the others run")
    parser.add_argument("--setups", nargs="*", help="run only these (default: PTQ_1 COMPOSITE_2 PRUNE_0.5)")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    dm = lifestream.target_datamodule(num_clients=args.clients, batch_size=64, seed=args.seed)
    common = {"num_threads": args.threads, "latency_repeats": 3, "latency_warmup": 1, "save_each": -1,
              "seed": args.seed}
    out = args.reuse or tempfile.mkdtemp(prefix="ptls_bench_")
    build = partial(lifestream.sequence_to_target, hidden_size=args.hidden)
    results = {name: reloaded for name in ("RAW", *setups(args)) if (reloaded := reuse(Path(out) / name, build))}
    if "RAW" not in results:
        raw = fedcore_fit(build(), dm, "RAW", output_folder=f"{out}/RAW",
                          overrides={"common": common, "nodes": {"training": {
                              "epochs": args.epochs, "learning_rate": 3e-3, "keep_best": True,
                              "early_stopping": {"monitor": "val_loss", "patience": args.patience}}}},
                          limit_train_batches=args.limit_batches, hooks=[curves := Curves()])
        results["RAW"] = (raw.optimised_model, raw.metrics)
        print(f"RAW done at {time.perf_counter() - start:.0f} s\n{summary(curves)}", flush=True)
    failed = {}
    for name, (setup, overrides) in setups(args).items():
        if name in results or (args.setups and name not in args.setups):
            continue
        try:
            fit = fedcore_fit(results["RAW"][0], dm, setup, output_folder=f"{out}/{name}",
                              overrides={"common": common, **overrides}, limit_train_batches=args.limit_batches,
                              hooks=[curves := Curves()])
            results[name] = (fit.optimised_model, fit.metrics)
            print(f"{name} done at {time.perf_counter() - start:.0f} s\n{summary(curves)}", flush=True)
        except Exception as err:  # noqa: BLE001 - reported in the table, the other setups still run
            failed[name] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    for name in setups(args):  # completed meanwhile by another process writing into --reuse
        if name not in results and name not in failed and (reloaded := reuse(Path(out) / name, build)):
            results[name] = reloaded
    results = {name: results[name] for name in ("RAW", *setups(args)) if name in results}
    x, _ = next(iter(dm.test_dataloader()))
    one = lifestream.first_sequences(x, 1)
    models = {name: model for name, (model, _) in results.items()}
    latency = side_by_side(models, {1: one, 64: x}, args.rounds, args.threads)
    rows = []
    for name, (model, metrics) in results.items():
        row = metrics[-1]
        accuracy, lr_accuracy = downstream(model, dm.test_dataloader())
        rows.append({"model": name, "nodes": "+".join(r["kind"] for r in metrics[1:]),
                     "params": row["params"], "size_mb": row["size_mb"], "dtype": row["dtype"],
                     "latency_b1_ms": latency[name, 1], "latency_b64_ms": latency[name, 64],
                     "test_accuracy": accuracy, "downstream_lr_accuracy": lr_accuracy,
                     "wall_s": sum(r.get("wall_s") or 0 for r in metrics[1:])})
    base = rows[0]
    for row in rows:
        row["smaller_x"] = base["size_mb"] / row["size_mb"]
        row["faster_b1_x"] = base["latency_b1_ms"] / row["latency_b1_ms"]
        row["faster_b64_x"] = base["latency_b64_ms"] / row["latency_b64_ms"]
        row["d_test_pt"] = round(100 * (row["test_accuracy"] - base["test_accuracy"]), 2)  # no 1e-14 from float noise
        row["d_downstream_pt"] = round(100 * (row["downstream_lr_accuracy"] - base["downstream_lr_accuracy"]), 2)
    print(environment(), f"| {args}")
    print(markdown(rows, ["model", "nodes", "params", "size_mb", "smaller_x", "dtype", "latency_b1_ms", "faster_b1_x",
                          "latency_b64_ms", "faster_b64_x", "test_accuracy", "d_test_pt", "downstream_lr_accuracy",
                          "d_downstream_pt", "wall_s"]))
    for name, error in failed.items():
        print(f"{name} failed: {error}")
    print(f"wall {time.perf_counter() - start:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
