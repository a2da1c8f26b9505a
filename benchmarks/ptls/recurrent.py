"""A ptls GRU encoder (hidden 256): hidden-unit pruning at 0.5 and dynamic int8, side by side with fp32.

    python -m benchmarks.ptls.recurrent [--hidden 256] [--ratio 0.5] [--rounds 7] [--threads 1] [--json out.json]

The model is a pytorch-lifestream ``SequenceToTarget`` (``RnnSeqEncoder``: an mcc embedding and
amounts -> GRU -> last step; a Linear head; torchmetrics accuracy), untrained (weights at their
init: this measures structure, size and speed, not quality). The ``pruning`` node (ratio 0.5, no
fine-tune) and the ``ptq_dynamic`` node run on it as a setup would run them; each result is saved
in the checkpoint format and reloaded with ``load_model`` onto a freshly built module, and the
reloaded models are the ones measured (the last row: int8 after pruning, both replayed). The int8
rows' output error is against their own float input model. Params count packed int8 weights; bytes are the checkpoint's
``state.pt``; latency is one PaddedBatch of 1 and of 64 sequences (50-300 events, padded),
variants interleaved round by round (``benchmarks.timing``). Ratios: fp32 / variant.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from functools import partial
from pathlib import Path

import torch
import torchmetrics
from ptls.data_load.padded_batch import PaddedBatch
from ptls.frames.supervised import SequenceToTarget
from ptls.nn import RnnSeqEncoder, TrxEncoder
from torch import nn

from fedcore_adapter import load_model
from fedcore_adapter.checkpoint import applied_transforms, save_checkpoint
from fedcore_adapter.context import NodeContext
from fedcore_adapter.metrics import count_macs, count_params
from fedcore_adapter.nodes.pruning import PruningConfig
from fedcore_adapter.nodes.pruning.node import apply_pruning
from fedcore_adapter.nodes.quantization import PTQDynamicConfig
from fedcore_adapter.nodes.quantization.dynamic import apply_ptq_dynamic
from fedcore_adapter.schema import CommonConfig
from fedcore_adapter.structure import transform_record

from benchmarks.common import environment, markdown
from benchmarks.timing import interleaved_latency


def build(hidden: int, seed: int = 0) -> SequenceToTarget:
    torch.manual_seed(seed)
    trx = TrxEncoder(embeddings={"mcc": {"in": 200, "out": 16}}, numeric_values={"amount": "log"})
    encoder = RnnSeqEncoder(trx_encoder=trx, hidden_size=hidden, type="gru")
    return SequenceToTarget(encoder, head=nn.Linear(hidden, 2), loss=nn.CrossEntropyLoss(),
                            metric_list=torchmetrics.Accuracy(task="multiclass", num_classes=2),
                            optimizer_partial=partial(torch.optim.Adam, lr=1e-3),
                            lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=1)).eval()


def transactions(n: int, seed: int) -> PaddedBatch:
    """``n`` clients with 50-300 events each (mcc codes and amounts), padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(50, 301, (n,), generator=g)
    length = int(lens.max())
    mask = torch.arange(length)[None] < lens[:, None]
    mcc = torch.randint(1, 200, (n, length), generator=g) * mask
    amount = torch.randn(n, length, generator=g).exp().mul(100) * mask
    return PaddedBatch({"mcc": mcc, "amount": amount}, lens)


def run_node(apply, config, model: nn.Module, hidden: int, out: Path) -> tuple[nn.Module, int]:
    """Run one node, save its result in the checkpoint format, reload it onto a fresh module."""
    records = applied_transforms(model)
    loader = [(transactions(16, seed=1), torch.zeros(16, dtype=torch.long))]
    ctx = NodeContext(train_loader=loader, val_loader=loader, test_loader=None, loss_fn=None,
                      device=torch.device("cpu"), teacher=model, output_dir=out / "work", common=CommonConfig(),
                      node_label="0:bench", structure_recorder=lambda n, d: records.append(transform_record(n, d)))
    result = apply(copy.deepcopy(model), config, ctx)
    save_checkpoint(result, out / "ckpt", records)
    return load_model(out / "ckpt", build(hidden, seed=99)), (out / "ckpt" / "state.pt").stat().st_size


class Unpadded(nn.Module):
    """``model`` called with the tensors of a PaddedBatch (so the MAC count sees the batch size)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, mcc, amount, lens):
        return self.model(PaddedBatch({"mcc": mcc, "amount": amount}, lens))


def macs_per_sample(model: nn.Module, batch: PaddedBatch) -> int:
    return count_macs(Unpadded(model), (batch.payload["mcc"], batch.payload["amount"], batch.seq_lens))


def gru_params(model: nn.Module) -> int:
    return sum(count_params(m) for m in model.modules() if "GRU" in type(m).__name__)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32 = build(args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(fp32, tmp / "fp32", [])
        variants = {"fp32": (fp32, (tmp / "fp32" / "state.pt").stat().st_size)}
        variants[f"pruning {args.ratio}"] = run_node(apply_pruning, PruningConfig(pruning_ratio=args.ratio), fp32,
                                                     args.hidden, tmp / "pruned")
        variants["ptq_dynamic"] = run_node(apply_ptq_dynamic, PTQDynamicConfig(), fp32, args.hidden, tmp / "int8")
        variants[f"pruning {args.ratio} + ptq_dynamic"] = run_node(
            apply_ptq_dynamic, PTQDynamicConfig(), variants[f"pruning {args.ratio}"][0], args.hidden, tmp / "both")
    batches = {1: transactions(1, seed=2), 64: transactions(64, seed=3)}
    timings = {b: interleaved_latency({n: partial(m, x) for n, (m, _) in variants.items()}, "fp32", rounds=args.rounds)
               for b, x in batches.items()}
    with torch.inference_mode():
        reference = {"ptq_dynamic": fp32(batches[64]),
                     f"pruning {args.ratio} + ptq_dynamic": variants[f"pruning {args.ratio}"][0](batches[64])}
    rows = []
    for name, (model, size) in variants.items():
        with torch.inference_mode():
            out = model(batches[64])
        row = {"variant": name, "params": count_params(model), "GRU params": gru_params(model),
               "bytes": size, "MACs/sample": macs_per_sample(model, batches[64]),
               "params ×": count_params(fp32) / count_params(model),
               "GRU params ×": gru_params(fp32) / gru_params(model), "bytes ×": variants["fp32"][1] / size}
        for b, t in timings.items():
            row[f"ms b{b}"] = t[name]["latency_ms"]
            row[f"speed-up b{b}"] = t[name]["speedup"]
            row[f"range b{b}"] = f"{t[name]['speedup_min']:.2f}-{t[name]['speedup_max']:.2f}"
        if name in reference:
            row["output rel. error"] = float((out - reference[name]).norm() / reference[name].norm())
        rows.append(row)
    columns = ["variant", "params", "GRU params", "bytes", "MACs/sample", "params ×", "GRU params ×", "bytes ×",
               "ms b1", "speed-up b1", "range b1", "ms b64", "speed-up b64", "range b64", "output rel. error"]
    print(environment())
    print(markdown(rows, columns))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
