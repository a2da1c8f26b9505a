"""How far a composite setup's final structure can go with far more training than the setup gives it.

Loads a final model from a results folder (``composite_setups.py`` writes them) and keeps training it
on MNIST-1D in chunks of 20 epochs (Adam, distilling from the RAW model with the task loss, last
epoch kept), printing the test accuracy after each chunk. If even several times the setup's epochs
leave it far below RAW, the shortfall is the structure's capacity, not the fine-tune recipe.

    python -m benchmarks.studies.composite_capacity FINAL_DIR RAW_FINAL_DIR [--chunks 4] [--lr 1e-3 3e-3]
"""
from __future__ import annotations

import argparse
import copy

import torch

from fedcore_adapter import load_model
from fedcore_adapter.context import NodeContext
from fedcore_adapter.metrics import evaluate
from fedcore_adapter.schema import CommonConfig, TrainParams
from fedcore_adapter.trainer import train
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
from fedcore_adapter.zoo.models import MNIST1DCNN


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("final")
    parser.add_argument("raw")
    parser.add_argument("--chunks", type=int, default=4, help="chunks of 20 epochs")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3])
    args = parser.parse_args()
    dm, loss, cpu = MNIST1DDataModule(), torch.nn.CrossEntropyLoss(), torch.device("cpu")
    model, raw = load_model(args.final, MNIST1DCNN()), load_model(args.raw, MNIST1DCNN())
    params = sum(p.numel() for p in model.parameters())
    print(f"start: {evaluate(model, dm.test_dataloader(), loss, cpu)['accuracy']:.3f} test accuracy, {params} params")
    ctx = NodeContext(train_loader=dm.train_dataloader(), val_loader=dm.val_dataloader(), test_loader=None,
                      loss_fn=loss, device=cpu, teacher=raw, output_dir=None, common=CommonConfig())
    for lr in args.lr:
        student = copy.deepcopy(model)
        for chunk in range(args.chunks):
            train(student, ctx, TrainParams(epochs=20, learning_rate=lr, progress=False, keep_best=False, distill=True),
                  node_input=raw)
            acc = evaluate(student, dm.test_dataloader(), loss, cpu)["accuracy"]
            print(f"lr {lr:g}: +{(chunk + 1) * 20} epochs -> {acc:.3f} test accuracy", flush=True)


if __name__ == "__main__":
    main()
