"""Engine overhead: the same training chain as a plain PyTorch loop and through the engine (measurement off).

Both train the MNIST-1D CNN with Adam for E epochs with per-epoch validation, from the same seed;
runs alternate (plain, engine, plain, engine, ...) and the ratio of medians is reported.

    python -m benchmarks.engine.overhead [--epochs 10 --repeats 5]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from fedcore_adapter import run_setup
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
from fedcore_adapter.zoo.models import MNIST1DCNN

from benchmarks.common import environment, median


def plain_loop(dm, epochs: int) -> float:
    torch.manual_seed(0)
    model = MNIST1DCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in dm.train_dataloader():
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in dm.val_dataloader():
                out = model(x)
                loss_fn(out, y)
                correct += int((out.argmax(1) == y).sum())
    return time.perf_counter() - start


def engine(dm, epochs: int) -> float:
    torch.manual_seed(0)
    model = MNIST1DCNN()
    setup = {"name": "OVERHEAD", "common": {"measure": False},
             "nodes": [{"kind": "training", "epochs": epochs, "progress": False}]}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_setup(setup, model, dm, output_dir=out)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    dm = MNIST1DDataModule()
    plain, through = [], []
    engine(dm, 1)  # warm imports
    for _ in range(args.repeats):
        plain.append(plain_loop(dm, args.epochs))
        through.append(engine(dm, args.epochs))
    print(environment())
    print(f"plain loop: median {median(plain):.2f} s  {['%.2f' % t for t in plain]}")
    print(f"engine    : median {median(through):.2f} s  {['%.2f' % t for t in through]}")
    print(f"engine / plain = {median(through) / median(plain):.3f}")


if __name__ == "__main__":
    main()
