"""all-MiniLM-L6-v2 int8: speed-up, size ratio and embedding cosine to fp32, measured side by side.

    python -m benchmarks.quantization.minilm [--alphas 0.7] [--gains 3] [--all-layers] [--rounds 7] [--json out.json]

Batch 32 x 128 tokens, 2 threads. Cosine of the mean-pooled sentence embeddings
to fp32 over 256 real English sentences (disjoint from the 64 used to calibrate
SmoothQuant). Sizes are the bytes of the saved checkpoint (``state.pt``), as
the engine's ``size_mb`` reports them. Variants:

- ``torch.ao dynamic``: stock ``torch.ao.quantization.quantize_dynamic``, per-channel
  Linear + int8 Embedding (activations 7-bit: torch.ao's ``reduce_range``)
- ``ptq_dynamic``: this project's node, ``allow_emb=true`` (8-bit activations on VNNI CPUs)
- ``ptq_dynamic smooth=a``: the same plus SmoothQuant with migration strength ``a`` on the
  Linears where it divides the layer's own int8 error by >= 10 (``smooth_min_gain``; on
  MiniLM: the six FFN inputs and one or two value projections), ``every Linear``: ``smooth_min_gain=1``;
  ``--gains g``: also with ``smooth_min_gain=g``
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import tempfile
from pathlib import Path

import torch

from fedcore_adapter import run_setup
from fedcore_adapter.zoo.text import TextDataModule, embedding_cosine, load_minilm

from benchmarks.common import environment, markdown
from benchmarks.timing import interleaved_latency


def state_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def stock_torch_ao(model: torch.nn.Module) -> torch.nn.Module:
    from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: per_channel_dynamic_qconfig,
                                                   torch.nn.Embedding: float_qparams_weight_only_qconfig})


def node_variant(model: torch.nn.Module, dm: TextDataModule, node: dict, out: Path) -> tuple[torch.nn.Module, int]:
    """The model as the engine's node returns it, and its checkpoint's bytes."""
    setup = {"name": "q", "common": {"measure": False}, "nodes": [node]}
    result = run_setup(setup, model, dm, output_dir=out)
    return result.model, (result.output_dir / "final" / "state.pt").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.7])
    parser.add_argument("--all-layers", action="store_true", help="also smooth every Linear (smooth_min_gain=1)")
    parser.add_argument("--gains", type=float, nargs="*", default=[], help="also these smooth_min_gain values")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = load_minilm()
    dm = TextDataModule(n_train=64, n_val=64, n_test=256, batch_size=32, max_length=128)
    variants = {"fp32": (model, state_bytes(model))}
    stock = stock_torch_ao(model)
    variants["torch.ao dynamic (per-channel + emb)"] = (stock, state_bytes(stock))
    with tempfile.TemporaryDirectory() as tmp:
        base = {"kind": "ptq_dynamic", "allow_emb": True}
        variants["ptq_dynamic allow_emb"] = node_variant(model, dm, base, Path(tmp) / "plain")
        for alpha in args.alphas:
            variants[f"ptq_dynamic allow_emb smooth={alpha}"] = node_variant(
                model, dm, {**base, "smooth_alpha": alpha}, Path(tmp) / f"smooth{alpha}")
            for gain in args.gains:
                variants[f"ptq_dynamic allow_emb smooth={alpha} min_gain={gain:g}"] = node_variant(
                    model, dm, {**base, "smooth_alpha": alpha, "smooth_min_gain": gain}, Path(tmp) / f"g{gain}{alpha}")
            if args.all_layers:
                variants[f"ptq_dynamic allow_emb smooth={alpha} every Linear"] = node_variant(
                    model, dm, {**base, "smooth_alpha": alpha, "smooth_min_gain": 1.0}, Path(tmp) / f"all{alpha}")
    batch = next(iter(dm.test_dataloader()))
    timing = interleaved_latency({name: (lambda m=m: m(**batch)) for name, (m, _) in variants.items()}, "fp32",
                                 rounds=args.rounds)
    rows = []
    for name, (m, size) in variants.items():
        cos = embedding_cosine(model, m, dm.test_dataloader()) if m is not model else {"mean_cosine": 1.0,
                                                                                     "min_cosine": 1.0}
        rows.append({"variant": name, "latency_ms": timing[name]["latency_ms"], "speedup": timing[name]["speedup"],
                     "speedup_range": f"{timing[name]['speedup_min']:.2f}-{timing[name]['speedup_max']:.2f}",
                     "size_mb": size / 2**20, "size_ratio": variants["fp32"][1] / size, **cos})
    print(environment())
    print(markdown(rows, list(rows[0])))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
