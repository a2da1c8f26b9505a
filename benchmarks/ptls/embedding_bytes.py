"""Checkpoint bytes of the ptls GRU-256 classifier after ``ptq_dynamic`` without and with ``allow_emb`` (seconds).

    python -m benchmarks.ptls.embedding_bytes [--hidden 256]

The model is the one ``benchmarks.ptls.end_to_end`` trains (``lifestream.sequence_to_target``: a
``TrxEncoder`` with mcc and tr_type ``NoisyEmbedding``s and log amounts -> GRU -> head), at its init
(bytes do not depend on the weights). Each variant runs the node, is saved in the checkpoint format,
reloaded with ``load_model`` onto a freshly built model and checked to give the same outputs on a
batch of generated clients; bytes are the checkpoint's ``state.pt``; the output error is against fp32.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from fedcore_adapter import load_model
from fedcore_adapter.checkpoint import checkpoint_bytes, save_checkpoint
from fedcore_adapter.context import NodeContext
from fedcore_adapter.nodes.quantization import PTQDynamicConfig
from fedcore_adapter.nodes.quantization.dynamic import apply_ptq_dynamic
from fedcore_adapter.schema import CommonConfig
from fedcore_adapter.structure import transform_record
from fedcore_adapter.zoo import lifestream

from benchmarks.common import environment, markdown


def build(hidden: int, seed: int = 0):
    torch.manual_seed(seed)
    return lifestream.sequence_to_target(hidden_size=hidden).eval()


def variant(model, config: PTQDynamicConfig, hidden: int, out: Path) -> tuple:
    """The node's result reloaded from its checkpoint, the checkpoint's bytes and the node's notes."""
    records = []
    ctx = NodeContext(train_loader=None, val_loader=None, test_loader=None, loss_fn=None,
                      device=torch.device("cpu"), teacher=model, output_dir=out / "work", common=CommonConfig(),
                      node_label="0:ptq_dynamic",
                      structure_recorder=lambda name, data: records.append(transform_record(name, data)))
    result = apply_ptq_dynamic(copy.deepcopy(model), config, ctx)
    save_checkpoint(result, out / "ckpt", records)
    return result, load_model(out / "ckpt", build(hidden, seed=99)), checkpoint_bytes(out / "ckpt"), ctx.notes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    fp32 = build(args.hidden)
    batch, _ = next(iter(lifestream.target_datamodule(num_clients=100, batch_size=32).test_dataloader()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(fp32, tmp / "fp32", [])
        base = checkpoint_bytes(tmp / "fp32")
        rows.append({"variant": "fp32", "state.pt bytes": base, "bytes ×": 1.0})
        with torch.inference_mode():
            reference = fp32(batch)
        for name, emb in [("ptq_dynamic", False), ("ptq_dynamic allow_emb", True)]:
            result, loaded, size, notes = variant(fp32, PTQDynamicConfig(allow_emb=emb), args.hidden, tmp / name)
            embeddings = loaded.seq_encoder.trx_encoder.embeddings
            with torch.inference_mode():
                out, again = result(batch), loaded(batch)
            rows.append({"variant": name, "state.pt bytes": size, "bytes ×": base / size,
                         "embeddings": ", ".join(f"{k}: {type(m).__name__}" for k, m in embeddings.items()),
                         "output rel. error": float((out - reference).norm() / reference.norm()),
                         "reload identical": bool(torch.equal(out, again)), "note": "; ".join(notes)})
    print(environment())
    print(markdown(rows, ["variant", "state.pt bytes", "bytes ×", "embeddings", "output rel. error",
                          "reload identical", "note"]))


if __name__ == "__main__":
    main()
