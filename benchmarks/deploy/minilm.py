"""all-MiniLM-L6-v2 in its deployment runtimes, side by side in one run: torch fp32, our eager int8, each
runtime's own int8 applied by hand, our int8 through the ``deploy`` node on each runtime, and the composites
(falor low-rank + the runtime's int8 through the ``deploy`` node) on each runtime.

    python -m benchmarks.deploy.minilm [--rounds 5] [--goals 0.15 0.25] [--falor-cache /tmp/falor_minilm]
        [--ffn-ratios 0.1 0.2] [--prune-cache /tmp/ffn_minilm] [--quality-only]

Cells: 1 and 2 threads x batch 1 (one sentence, its own length), batch 32 padded to the longest, batch
32 x 128 tokens. Every round times every cell and every variant back to back
(``benchmarks.deploy.common.time_cells``, a pause before each variant); figures are medians over rounds,
ratios medians of per-round ratios. Quality: mean / min cosine of the mean-pooled sentence embeddings of
the 256 test sentences of ``benchmarks.quantization.minilm`` (same data module) to fp32's, through each
runtime. Sizes: bytes of what each runtime loads (``state.pt`` for torch, ``model.onnx``, ``model.xml+bin``).

- ``ORT int8 (by hand)``: ``torch.onnx.export`` + ``onnxruntime.quantization.quantize_dynamic`` (per-channel
  QInt8), what an ONNX Runtime user deploys.
- ``OpenVINO int8 (by hand)``: ``openvino.convert_model`` + ``nncf.quantize`` (transformer preset, the 64
  training sentences), what an OpenVINO user deploys.
- ``deploy <runtime>``: this project's ``deploy`` node on the fp32 model (the parity target: within 5 % of
  the runtime's own int8 at equal or better cosine).
- ``falor <goal> + deploy <runtime>``: README's falor node (``<goal>`` of the Linear params removed, no
  training) then the ``deploy`` node (the composite target: faster than the runtime's own int8 at mean
  cosine >= 0.98).
- ``ffn <r> + deploy <runtime>``: the ``pruning`` node removing the share r of every layer's FFN channels
  (no heads: ``head_pruning_ratio 0``; ``--importance``, default Taylor; counts a multiple of 32), its final
  fine-tune a distillation from the original's last hidden states on the non-test sentences, then the
  ``deploy`` node. Small ratios only: 50 % of heads and FFN channels keep mean cosine 0.79 after distillation
  (``pruning.minilm``), and even 5 % of the FFN channels stays under 0.98 (RESULTS, *Deployment runtimes*).

``--quality-only``: build every variant and print its size and cosine, no timing (the probe that picks the
ratios worth timing).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fedcore_adapter import run_setup
from fedcore_adapter.checkpoint import load_model
from fedcore_adapter.deploy import load_artifact
from fedcore_adapter.metrics import count_params
from fedcore_adapter.zoo.text import TextDataModule, load_minilm, load_tokenizer, sentence_embeddings

from benchmarks.common import environment, markdown
from benchmarks.deploy.common import RUNTIMES, against_own_int8, latency_rows, ov_by_hand, time_cells
from benchmarks.low_rank.minilm import EXCLUDE, linear_params, wide_calibration
from benchmarks.low_rank.minilm_node import Sentences

NAMES = ("input_ids", "attention_mask", "token_type_ids")


class Encoder(nn.Module):
    """``(input_ids, attention_mask, token_type_ids) -> last_hidden_state``: what ``torch.onnx.export`` traces."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def ort_by_hand(model: nn.Module, batch: dict, folder: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    axes = {k: {0: "batch", 1: "seq"} for k in NAMES}
    torch.onnx.export(Encoder(model).eval(), tuple(batch[k] for k in NAMES), str(fp32), dynamo=False, input_names=list(NAMES),
                      output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    return int8


def falor_model(original: nn.Module, dm: TextDataModule, goal: float, cache: Path | None) -> tuple[nn.Module, float]:
    """README's falor node on MiniLM (the model and the node's seconds; 0 when read from ``cache``)."""
    cache = cache / f"goal_{goal:g}" if cache is not None else None
    if cache is not None and (cache / "final").exists():
        return load_model(cache, load_minilm()), 0.0
    wide = wide_calibration(dm, 256, 16)
    node = {"kind": "low_rank", "method": "falor", "layer_types": ["linear"], "exclude": EXCLUDE,
            "allocation": "global", "falor_metric": "cosine", "grid_points": 10, "metric_batches": 3,
            "calibration_batches": len(wide), "falor_fit": "sequential", "falor_weighting": "gradient",
            "falor_damping": 1.0, "falor_refit_kept": True,
            "budget": {"metric": "params", "value": int(count_params(original) - goal * linear_params(original))}}
    start = time.perf_counter()
    result = run_setup({"name": "falor", "common": {"measure": False}, "nodes": [node]}, copy.deepcopy(original),
                       Sentences(wide, dm.test_dataloader()), output_dir=Path(tempfile.mkdtemp()))
    seconds = time.perf_counter() - start
    if cache is not None:
        shutil.copytree(result.output_dir, cache)
    return result.model, seconds


def ffn_pruned_model(original: nn.Module, dm: TextDataModule, ratio: float, importance: str, epochs: int, lr: float,
                     cache: Path | None) -> tuple[nn.Module, float]:
    """The ``pruning`` node on MiniLM's FFN channels only, then distilled from the original on every non-test
    sentence (the model and the node's seconds; 0 when read from ``cache``)."""
    cache = cache / f"ffn_{ratio:g}_{importance}_e{epochs}_lr{lr:g}" if cache is not None else None
    if cache is not None and (cache / "final").exists():
        return load_model(cache, load_minilm()), 0.0
    node = {"kind": "pruning", "pruning_ratio": ratio, "head_pruning_ratio": 0.0, "importance": importance,
            "round_to": 32, "finetune_params": {"epochs": epochs, "learning_rate": lr}}
    start = time.perf_counter()
    result = run_setup({"name": "ffn", "common": {"measure": False, "seed": 0}, "nodes": [node]},
                       copy.deepcopy(original), Sentences(wide_calibration(dm, len(dm.test), 32), dm.test_dataloader()),
                       output_dir=Path(tempfile.mkdtemp()))
    seconds = time.perf_counter() - start
    if cache is not None:
        shutil.copytree(result.output_dir, cache)
    return result.model, seconds


def deploy(model: nn.Module, dm: TextDataModule, runtime: str, folder: Path) -> Path:
    # quality is judged on the embeddings' cosine below; the node's own agreement check (relative error of the
    # hidden states <= 0.2 by default) refuses falor + ONNX Runtime's dynamic int8 (0.32), so it is widened here
    node = {"kind": "deploy", "runtime": runtime, "calibration_batches": 2, "tolerance": 1.0}
    result = run_setup({"name": f"deploy_{runtime}", "common": {"measure": False}, "nodes": [node]}, model, dm,
                       output_dir=folder)
    return result.output_dir / "final"


def state_mb(model: nn.Module) -> float:
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--goals", type=float, nargs="*", default=[0.15, 0.25],
                        help="falor composites: fractions of the Linear params removed (none: no composite)")
    parser.add_argument("--falor-cache", type=Path, help="folder keeping the falor models between runs (goal_<g>/)")
    parser.add_argument("--ffn-ratios", type=float, nargs="*", default=[],
                        help="FFN-pruning composites: fractions of each layer's FFN channels removed")
    parser.add_argument("--importance", default="taylor", help="the pruning node's channel ranking")
    parser.add_argument("--distil-epochs", type=int, default=8, help="the pruning node's distillation epochs")
    parser.add_argument("--distil-lr", type=float, default=1e-4)
    parser.add_argument("--prune-cache", type=Path, help="folder keeping the FFN-pruned models between runs")
    parser.add_argument("--quality-only", action="store_true", help="sizes and cosines only, no timing")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--sentences", type=int, default=256, help="test sentences (fewer for a smoke run)")
    parser.add_argument("--settle", type=float, default=0.1, help="seconds of pause before each timed variant")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = load_minilm()
    dm = TextDataModule(n_train=64, n_val=64, n_test=args.sentences, batch_size=32, max_length=128)
    test = dm.sentences[-args.sentences:]
    tok = load_tokenizer()
    settings = {
        "batch 1": dict(tok(test[:1], return_tensors="pt")),
        "batch 32, longest": dict(tok(test[:32], padding="longest", truncation=True, max_length=128,
                                      return_tensors="pt")),
        "batch 32 x 128": dict(tok(test[:32], padding="max_length", truncation=True, max_length=128,
                                   return_tensors="pt")),
    }
    built: dict[str, tuple] = {}  # name -> (make(threads) -> module, size_mb)
    seconds: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="deploy_minilm_"))
    built["torch fp32"] = (lambda t: model, state_mb(model))
    start = time.perf_counter()
    ours = run_setup({"name": "q", "common": {"measure": False},
                      "nodes": [{"kind": "ptq_dynamic", "allow_emb": True, "smooth_alpha": 0.7}]}, model, dm,
                     output_dir=tmp / "ptq")
    seconds["ours eager int8"] = time.perf_counter() - start
    built["ours eager int8 (ptq_dynamic)"] = (lambda t: ours.model,
                                              (ours.output_dir / "final" / "state.pt").stat().st_size / 2**20)
    batch = next(iter(dm.train_dataloader()))
    start = time.perf_counter()
    ort_path = ort_by_hand(model, batch, tmp)
    seconds["ORT by hand"] = time.perf_counter() - start
    built["ORT int8 (by hand)"] = (lambda t: load_artifact(ort_path, threads=t), ort_path.stat().st_size / 2**20)
    start = time.perf_counter()
    calibration = [{k: b[k].numpy() for k in NAMES} for b in dm.train_dataloader()]
    ov_path = ov_by_hand(model, {k: batch[k] for k in NAMES}, calibration, tmp, transformer=True)
    seconds["OpenVINO by hand"] = time.perf_counter() - start
    built["OpenVINO int8 (by hand)"] = (lambda t: load_artifact(ov_path, threads=t),
                                        (ov_path.stat().st_size + ov_path.with_suffix(".bin").stat().st_size) / 2**20)
    bases = [("", model)]
    for goal in args.goals:
        falor, seconds[f"falor {goal:g} node"] = falor_model(model, dm, goal, args.falor_cache)
        bases.append((f"falor {goal:g} + ", falor))
        built[f"falor {goal:g} torch fp32"] = (lambda t, m=falor: m, state_mb(falor))
    for ratio in args.ffn_ratios:
        pruned, seconds[f"ffn {ratio:g} node"] = ffn_pruned_model(model, dm, ratio, args.importance,
                                                                  args.distil_epochs, args.distil_lr, args.prune_cache)
        bases.append((f"ffn {ratio:g} + ", pruned))
        built[f"ffn {ratio:g} torch fp32"] = (lambda t, m=pruned: m, state_mb(pruned))
    composites: dict[str, list[str]] = {}
    for label, base in bases:
        for runtime in RUNTIMES:
            start = time.perf_counter()
            name = f"{label}deploy {runtime}"
            folder = deploy(base, dm, runtime, tmp / name.replace(" ", "_").replace("+", ""))
            seconds[name] = time.perf_counter() - start
            built[name] = (lambda t, f=folder: load_artifact(f, threads=t), load_artifact(folder).artifact_bytes() / 2**20)
            if label:
                composites.setdefault(runtime, []).append(name)

    reference = sentence_embeddings(model, dm.test_dataloader())
    quality = {}
    for name, (make, _) in built.items():
        emb = sentence_embeddings(make(2), dm.test_dataloader())
        cos = torch.nn.functional.cosine_similarity(reference, emb, dim=1)
        quality[name] = (float(cos.mean()), float(cos.min()))
    if args.quality_only:
        print(environment())
        print("build seconds:", json.dumps({k: round(v) for k, v in seconds.items()}))
        print(markdown([{"variant": name, "size_mb": round(size, 1), "mean_cos": round(quality[name][0], 4),
                         "min_cos": round(quality[name][1], 4)} for name, (_, size) in built.items()],
                       ["variant", "size_mb", "mean_cos", "min_cos"]))
        return

    times = time_cells({name: make for name, (make, _) in built.items()},
                       {setting: (lambda m, b=inputs: m(**b)) for setting, inputs in settings.items()},
                       args.threads, args.rounds, per_round=lambda setting: 10 if setting == "batch 1" else 3,
                       settle=args.settle)
    rows = [{"variant": name, "size_mb": round(size, 1), "mean_cos": round(quality[name][0], 4),
             "min_cos": round(quality[name][1], 4)} | row
            for (name, (_, size)), row in zip(built.items(), latency_rows(list(built), times, "torch fp32"))]
    qualified = {name for name, (mean, _) in quality.items() if mean >= 0.98}
    own, verdict = against_own_int8(times, composites, qualified)
    print(environment())
    print("build seconds:", json.dumps({k: round(v) for k, v in seconds.items()}))
    print(markdown(rows, list(rows[0])))
    print("\nlatency / the runtime's own int8 (median of per-round ratios, range; < 1: faster):")
    print(markdown(own, list(own[0])))
    print("best composite at mean cosine >= 0.98, per runtime:", json.dumps(verdict))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "against_own_int8": own, "verdict": verdict,
                                         "times": {"|".join(map(str, k)): v for k, v in times.items()},
                                         "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
