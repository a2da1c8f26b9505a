"""A pytorch-lifestream CoLES encoder pre-trained and compressed with fedcore-adapter; its embeddings checked
downstream.

    python examples/ptls_coles.py
    PTLS_CLIENTS=3000 PTLS_MAX_LEN=300 PTLS_HIDDEN=256 PTLS_EPOCHS=5 python examples/ptls_coles.py   # bigger

1. generated transactions -> a ptls ``PtlsDataModule`` (``ColesDataset``, random slices) and a
   ``CoLESModule`` (``TrxEncoder`` -> GRU), all real ptls objects;
2. pre-train it through the RAW setup: ``fedcore_fit`` trains it on CoLES's own contrastive loss;
3. compress the pre-trained model with the PTQ_1 setup (low-rank, then dynamic int8);
4. the ``fedcore-adapter inference`` command writes every client's embedding for every node of that run;
5. downstream: a logistic regression on the embeddings predicts each client's class (what compression cost).
Needs the ptls extra: ``pip install 'fedcore-adapter[ptls]'``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from fedcore_adapter import fedcore_fit
from fedcore_adapter.zoo import lifestream

SETUP = "PTQ_1"  # training, low-rank, dynamic int8 (GRU and Linear)
EPOCHS = int(os.environ.get("PTLS_EPOCHS", "2"))
HIDDEN = int(os.environ.get("PTLS_HIDDEN", "64"))
DATA = {"num_clients": int(os.environ.get("PTLS_CLIENTS", "400")), "min_len": 50,
        "max_len": int(os.environ.get("PTLS_MAX_LEN", "100")), "seed": 0}
QUICK = {"common": {"latency_repeats": 5, "latency_warmup": 1, "num_threads": 1}}


def pretrain(root: Path):
    """The CoLES module trained through the RAW setup for ``EPOCHS`` epochs."""
    model = lifestream.coles_module(hidden_size=HIDDEN)
    dm = lifestream.coles_datamodule(**DATA, batch_size=32)
    overrides = {**QUICK, "nodes": {"training": {"epochs": EPOCHS, "learning_rate": 3e-3}}}
    return fedcore_fit(model, dm, "RAW", output_folder=str(root / "RAW_coles"), overrides=overrides), dm


def compress(pretrained, dm, root: Path):
    """``SETUP`` on the pre-trained model (its training node skipped): one low-rank epoch and one fine-tune
    epoch of a few batches."""
    overrides = {**QUICK, "nodes": {"training": {"epochs": 0},
                                    "low_rank": {"method": {"epochs": 1}, "finetune_params": {"epochs": 1}}}}
    return fedcore_fit(pretrained, dm, SETUP, output_folder=str(root / f"{SETUP}_coles"), overrides=overrides,
                       limit_train_batches=4)


def embed_with_the_inference_command(results: Path, out: Path) -> list[Path]:
    """``fedcore-adapter inference`` on every node of ``results``: each client's embedding (and class)."""
    data = [f"data.{k}={v}" for k, v in DATA.items()]
    command = [sys.executable, "-m", "fedcore_adapter", "inference", "tracking=none", "model=ptls_coles",
               f"model.hidden_size={HIDDEN}", "data=ptls_target", *data, "data.test_split=all",
               f"inference_model={results}", f"inference.output={out}", "common.device=cpu"]
    print("$", " ".join(command[1:]))
    subprocess.run(command, check=True)
    return sorted(out.glob("scores_*.csv"))


def downstream(score_files: list[Path], rows: list[dict]) -> pd.DataFrame:
    """Downstream accuracy of each node's embeddings beside its size and latency."""
    by_node = {f"{r['node_index']}_{r['kind']}": r for r in rows}
    table = []
    for path in score_files:
        node = path.stem[len("scores_"):]
        frame = pd.read_csv(path)
        accuracy = lifestream.downstream_accuracy(frame.filter(like="emb_").to_numpy(), frame["target"].to_numpy())
        row = by_node.get(node, {})
        table.append({"node": node, "downstream_accuracy": round(accuracy, 4), "params": row.get("params"),
                      "size_mb": round(row.get("size_mb", float("nan")), 4), "dtype": row.get("dtype")})
    return pd.DataFrame(table)


def main(root: Path = Path("composition_results")) -> pd.DataFrame:
    raw, dm = pretrain(root)
    print(raw.summary())
    compressed = compress(raw.optimised_model, dm, root)
    print(compressed.summary())
    files = embed_with_the_inference_command(compressed.output_dir, root / f"{SETUP}_coles_embeddings")
    table = downstream(files, compressed.metrics)
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
