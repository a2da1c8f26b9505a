"""all-MiniLM-L6-v2 in its deployment runtimes, side by side in one run: torch fp32, our eager int8, each
runtime's own int8 applied by hand, our int8 through the ``deploy`` node on each runtime, and the composites
(falor low-rank + the runtime's int8 through the ``deploy`` node) on each runtime. ``--runtimes``: ONNX Runtime
and OpenVINO by default; ``torch_compile`` too (its own int8 by hand: torchao's PT2E recipe for x86 under
``torch.compile`` with freezing, ``benchmarks.deploy.common.CompiledByHand``; each variant compiles once per
thread count and input shape, seconds to a minute each).

    python -m benchmarks.deploy.minilm [--rounds 5] [--goals 0.15 0.25] [--falor-cache /tmp/falor_minilm]
        [--ffn-ratios 0.1 0.2] [--head-ratio 0] [--importance taylor] [--distill-loss cosine]
        [--distill-mse-weight 0] [--distill-sentences 3000] [--distill-epochs 3] [--lr 5e-5] [--reconstruct]
        [--prune-cache /tmp/ffn_minilm] [--quality-only] [--runtimes onnxruntime openvino torch_compile]

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
  (heads: ``--head-ratio``, default 0; ``--importance``, default Taylor; counts a multiple of 32), its final
  fine-tune a distillation from the original on unlabeled batches of 32 sentences (``--distill-loss``: ``mse``
  of the last hidden states, or ``cosine`` of the mean-pooled sentence embeddings, the node's
  ``unlabeled_loss``), then the ``deploy`` node. The distillation sentences: the non-test pydoc sentences
  (337), then, with ``--distill-sentences N`` above that, standard-library docstring sentences
  (``zoo.text.docstring_sentences``, never a test sentence) up to N in all. ``--distill-epochs 0``: the
  pruned model without a fine-tune. ``--reconstruct``: the node re-fits each block's pruned consumer by least
  squares on the same sentences (``reconstruct: true``, every batch; with ``--importance obs``, the units whose
  removal the re-fit repairs best). Small ratios only: 50 % of heads and FFN channels keep mean cosine 0.79
  after distillation (``pruning.minilm``), and even 5 % of the FFN channels stayed under 0.98 after 8 epochs
  of MSE distillation on 337 sentences (RESULTS, *Deployment runtimes*).

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
from fedcore_adapter.hooks import Hook
from fedcore_adapter.zoo.text import (TextDataModule, docstring_sentences, load_minilm, load_tokenizer,
                                      sentence_embeddings)

from benchmarks.common import environment, markdown
from benchmarks.deploy.common import (BY_HAND, RUNTIMES, CompiledByHand, against_own_int8, latency_rows, ov_by_hand,
                                      state_bytes,
                                      time_cells)
from benchmarks.low_rank.minilm import EXCLUDE, linear_params, non_test_sentences, sentence_batches, wide_calibration
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
    torch.onnx.export(Encoder(model).eval(), tuple(batch[k] for k in NAMES), str(fp32), dynamo=False,
                      input_names=list(NAMES), output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17)
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


def distillation_sentences(dm: TextDataModule, total: int | None) -> list[str]:
    """The non-test pydoc sentences, then docstring sentences (never a test sentence) up to ``total`` in all
    (None: the pydoc ones alone; fewer than them: their first ``total``)."""
    sentences = non_test_sentences(dm, len(dm.test))
    if total is None:
        return sentences
    return (sentences + docstring_sentences(max(total - len(sentences), 0), dm.seed))[:total]


class Curves(Hook):
    """Prints the fine-tune's epochs as they end: its mean batch loss, seconds, and seconds per step."""

    def __init__(self, steps_per_epoch: int):
        self.steps = steps_per_epoch

    def on_log(self, run, index, node, metrics, step):
        loss = next((v for k, v in metrics.items() if k.endswith("train_loss")), None)
        seconds = next((v for k, v in metrics.items() if k.endswith("epoch_s")), None)
        if loss is not None and seconds is not None:
            print(f"  distillation epoch {step}: train_loss {loss:.5g}, {seconds:.0f} s, "
                  f"{seconds / self.steps:.2f} s per step of 32 sentences", flush=True)


def ffn_pruned_model(original: nn.Module, dm: TextDataModule, ratio: float, args: argparse.Namespace,
                     cache: Path | None) -> tuple[nn.Module, float]:
    """The ``pruning`` node on MiniLM's FFN channels (and ``--head-ratio`` of the heads), then distilled from
    the original (``--distill-*``) (the model and the node's seconds; 0 when read from ``cache``)."""
    loss, weight, total = args.distill_loss, args.distill_mse_weight, args.distill_sentences
    key = (f"ffn_{ratio:g}_{args.importance}_e{args.distill_epochs}_lr{args.lr:g}"  # the first runs' names kept
           + (f"_heads{args.head_ratio:g}" if args.head_ratio else "")
           + (f"_{loss}" + (f"_mse{weight:g}" if weight else "") if loss != "mse" else "")
           + (f"_s{total}" if total is not None else "")
           + ("_reconstruct" if args.reconstruct else ""))
    cache = cache / key if cache is not None else None
    if cache is not None and (cache / "final").exists():
        return load_model(cache, load_minilm()), 0.0
    finetune = {"epochs": args.distill_epochs, "learning_rate": args.lr}
    if loss != "mse":
        finetune.update(unlabeled_loss=loss, unlabeled_mse_weight=weight)
    batches = sentence_batches(distillation_sentences(dm, total), 32)
    node = {"kind": "pruning", "pruning_ratio": ratio, "head_pruning_ratio": args.head_ratio,
            "importance": args.importance, "round_to": 32, "finetune_params": finetune}
    if args.reconstruct:
        node.update(reconstruct=True, calibration_batches=len(batches))
    print(f"ffn {ratio:g}: {sum(len(b['input_ids']) for b in batches)} distillation sentences, {len(batches)} "
          f"steps per epoch, {loss} loss", flush=True)
    start = time.perf_counter()
    result = run_setup({"name": "ffn", "common": {"measure": False, "seed": 0}, "nodes": [node]},
                       copy.deepcopy(original), Sentences(batches, dm.test_dataloader()),
                       output_dir=Path(tempfile.mkdtemp()), hooks=[Curves(len(batches))])
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
    return state_bytes(model) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--goals", type=float, nargs="*", default=[0.15, 0.25],
                        help="falor composites: fractions of the Linear params removed (none: no composite)")
    parser.add_argument("--falor-cache", type=Path, help="folder keeping the falor models between runs (goal_<g>/)")
    parser.add_argument("--ffn-ratios", type=float, nargs="*", default=[],
                        help="FFN-pruning composites: fractions of each layer's FFN channels removed")
    parser.add_argument("--importance", default="taylor", help="the pruning node's channel ranking")
    parser.add_argument("--reconstruct", action="store_true",
                        help="the pruning node's reconstruct: each block's pruned consumer re-fitted by least squares "
                             "on the distillation sentences (before the fine-tune)")
    parser.add_argument("--head-ratio", type=float, default=0.0, help="fraction of each layer's heads removed too")
    parser.add_argument("--distill-epochs", "--distil-epochs", type=int, default=8,
                        help="the pruning node's distillation epochs (0: no fine-tune)")
    parser.add_argument("--lr", "--distill-lr", "--distil-lr", type=float, default=1e-4,
                        help="the distillation's learning rate")
    parser.add_argument("--distill-loss", choices=["mse", "cosine"], default="mse",
                        help="the fine-tune's unlabeled_loss: mse of the last hidden states, or cosine of the "
                             "mean-pooled sentence embeddings")
    parser.add_argument("--distill-mse-weight", type=float, default=0.0,
                        help="with --distill-loss cosine: plus this weight times the hidden-state mse")
    parser.add_argument("--distill-sentences", type=int,
                        help="distillation sentences in all: the 337 non-test pydoc ones, then standard-library "
                             "docstring sentences (default: the pydoc ones alone)")
    parser.add_argument("--prune-cache", type=Path, help="folder keeping the FFN-pruned models between runs")
    parser.add_argument("--quality-only", action="store_true", help="sizes and cosines only, no timing")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--sentences", type=int, default=256, help="test sentences (fewer for a smoke run)")
    parser.add_argument("--settle", type=float, default=0.1, help="seconds of pause before each timed variant")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=sorted(BY_HAND),
                        help="runtimes timed (own int8 by hand, the deploy node, composites); torch_compile "
                             "compiles each variant once per thread count and input shape")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.distill_mse_weight and args.distill_loss != "cosine":
        parser.error("--distill-mse-weight adds the hidden-state mse to --distill-loss cosine")
    if args.distill_sentences is not None and args.distill_sentences < 32:
        parser.error(f"--distill-sentences must be at least 32, one batch (got {args.distill_sentences})")
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
    if "onnxruntime" in args.runtimes:
        start = time.perf_counter()
        ort_path = ort_by_hand(model, batch, tmp)
        seconds["ORT by hand"] = time.perf_counter() - start
        built[BY_HAND["onnxruntime"]] = (lambda t: load_artifact(ort_path, threads=t), ort_path.stat().st_size / 2**20)
    if "openvino" in args.runtimes:
        start = time.perf_counter()
        calibration = [{k: b[k].numpy() for k in NAMES} for b in dm.train_dataloader()]
        ov_path = ov_by_hand(model, {k: batch[k] for k in NAMES}, calibration, tmp, transformer=True)
        seconds["OpenVINO by hand"] = time.perf_counter() - start
        built[BY_HAND["openvino"]] = (lambda t: load_artifact(ov_path, threads=t),
                                      (ov_path.stat().st_size + ov_path.with_suffix(".bin").stat().st_size) / 2**20)
    if "torch_compile" in args.runtimes:  # as the deploy node calibrates: 2 training batches
        example = tuple(batch[k] for k in NAMES)
        calibration_args = [tuple(b[k] for k in NAMES) for _, b in zip(range(2), dm.train_dataloader())]
        start = time.perf_counter()
        pt2e_size = state_mb(CompiledByHand(Encoder(model), NAMES, example, calibration_args).converted)
        seconds["PT2E by hand (before compiling)"] = time.perf_counter() - start
        built[BY_HAND["torch_compile"]] = (lambda t: CompiledByHand(Encoder(model), NAMES, example, calibration_args),
                                           pt2e_size)
    bases = [("", model)]
    for goal in args.goals:
        falor, seconds[f"falor {goal:g} node"] = falor_model(model, dm, goal, args.falor_cache)
        bases.append((f"falor {goal:g} + ", falor))
        built[f"falor {goal:g} torch fp32"] = (lambda t, m=falor: m, state_mb(falor))
    for ratio in args.ffn_ratios:
        name = f"ffn {ratio:g}" + (f" heads {args.head_ratio:g}" if args.head_ratio else "")
        pruned, seconds[f"{name} node"] = ffn_pruned_model(model, dm, ratio, args, args.prune_cache)
        bases.append((f"{name} + ", pruned))
        built[f"{name} torch fp32"] = (lambda t, m=pruned: m, state_mb(pruned))
    composites: dict[str, list[str]] = {}
    for label, base in bases:
        for runtime in args.runtimes:
            start = time.perf_counter()
            name = f"{label}deploy {runtime}"
            folder = deploy(base, dm, runtime, tmp / name.replace(" ", "_").replace("+", ""))
            seconds[name] = time.perf_counter() - start
            built[name] = (lambda t, f=folder: load_artifact(f, threads=t),
                           load_artifact(folder).artifact_bytes() / 2**20)
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
    own, verdict = against_own_int8(times, composites, qualified, tuple(args.runtimes))
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
