"""all-MiniLM-L6-v2 in its deployment runtimes, side by side: torch fp32, our eager int8, each runtime's own
int8 applied by hand, the same through the ``deploy`` node, and the falor low-rank model + each runtime's int8.

    python -m benchmarks.deploy.minilm [--rounds 5] [--goal 0.25] [--falor-cache /tmp/falor_minilm]

Settings: batch 1 (one sentence, its own length), batch 32 padded to the longest, batch 32 x 128 tokens;
1 and 2 threads. Latency: every variant timed back to back in each round (``benchmarks.timing.interleaved_latency``),
medians over rounds of per-round ratios to torch fp32. Quality: mean / min cosine of the mean-pooled sentence
embeddings of the 256 test sentences of ``benchmarks.quantization.minilm`` (same data module) to fp32's.
Sizes: bytes of what each runtime loads (checkpoint ``state.pt`` for torch, ``model.onnx``, ``model.xml+bin``).

- ``ORT int8 (by hand)``: ``torch.onnx.export`` + ``onnxruntime.quantization.quantize_dynamic`` (per-channel QInt8),
  what an ONNX Runtime user deploys.
- ``OpenVINO int8 (by hand)``: ``openvino.convert_model`` + ``nncf.quantize`` (transformer preset, the 64
  training sentences), what an OpenVINO user deploys.
- ``deploy <runtime>``: this project's ``deploy`` node on the fp32 model; ``falor + deploy <runtime>``: on the
  falor low-rank model (README's node: ``--goal`` of the Linear params removed, no training).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcore_adapter import run_setup
from fedcore_adapter.checkpoint import load_model
from fedcore_adapter.deploy import load_artifact
from fedcore_adapter.metrics import count_params
from fedcore_adapter.zoo.text import TextDataModule, load_minilm, load_tokenizer, sentence_embeddings

from benchmarks.common import environment, markdown
from benchmarks.low_rank.minilm import EXCLUDE, linear_params, wide_calibration
from benchmarks.low_rank.minilm_node import Sentences
from benchmarks.timing import interleaved_latency

NAMES = ("input_ids", "attention_mask", "token_type_ids")


class Feed(nn.Module):
    """A hand-built runtime session called like the torch model: ``(**batch) -> last hidden state``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, **batch):
        return torch.from_numpy(np.asarray(self.fn({k: batch[k].numpy() for k in NAMES})))


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


def ort_session(path: Path, threads: int) -> Feed:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Feed(lambda feed: session.run(None, feed)[0])


def ov_by_hand(model: nn.Module, batch: dict, calibration: list[dict], folder: Path) -> Path:
    import nncf
    import openvino as ov

    ov_model = ov.convert_model(model, example_input={k: batch[k] for k in NAMES})
    data = nncf.Dataset([{k: b[k].numpy() for k in NAMES} for b in calibration])
    quantized = nncf.quantize(ov_model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    ov.save_model(quantized, str(folder / "int8.xml"), compress_to_fp16=False)
    return folder / "int8.xml"


def ov_session(path: Path, threads: int) -> Feed:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                           "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return Feed(lambda feed: request.infer(feed)[compiled.outputs[0]].copy())


def falor_model(original: nn.Module, dm: TextDataModule, goal: float, cache: Path | None) -> tuple[nn.Module, float]:
    """README's falor node on MiniLM (the model and the node's seconds; 0 when read from ``cache``)."""
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


def deploy(model: nn.Module, dm: TextDataModule, runtime: str, folder: Path) -> Path:
    node = {"kind": "deploy", "runtime": runtime, "calibration_batches": 2}
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
    parser.add_argument("--goal", type=float, default=0.25, help="falor: fraction of the Linear params removed")
    parser.add_argument("--falor-cache", type=Path, help="folder keeping the falor model between runs")
    parser.add_argument("--no-falor", action="store_true", help="leave out the composite (falor) variants")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = load_minilm()
    dm = TextDataModule(n_train=64, n_val=64, n_test=256, batch_size=32, max_length=128)
    test = dm.sentences[-256:]
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
    built["ORT int8 (by hand)"] = (lambda t: ort_session(ort_path, t), ort_path.stat().st_size / 2**20)
    start = time.perf_counter()
    ov_path = ov_by_hand(model, batch, list(dm.train_dataloader()), tmp)
    seconds["OpenVINO by hand"] = time.perf_counter() - start
    built["OpenVINO int8 (by hand)"] = (lambda t: ov_session(ov_path, t),
                                        (ov_path.stat().st_size + ov_path.with_suffix(".bin").stat().st_size) / 2**20)
    bases = [("", model)]
    if not args.no_falor:
        falor, seconds["falor node"] = falor_model(model, dm, args.goal, args.falor_cache)
        bases.append(("falor + ", falor))
        built["falor torch fp32"] = (lambda t: falor, state_mb(falor))
    for label, base in bases:
        for runtime in ("onnxruntime", "openvino"):
            start = time.perf_counter()
            folder = deploy(base, dm, runtime, tmp / f"{label.strip(' +')}{runtime}")
            seconds[f"{label}deploy {runtime}"] = time.perf_counter() - start
            runner = load_artifact(folder)
            built[f"{label}deploy {runtime}"] = (lambda t, f=folder: load_artifact(f, threads=t),
                                                 runner.artifact_bytes() / 2**20)

    reference = sentence_embeddings(model, dm.test_dataloader())
    quality = {}
    for name, (make, _) in built.items():
        emb = sentence_embeddings(make(2), dm.test_dataloader())
        cos = torch.nn.functional.cosine_similarity(reference, emb, dim=1)
        quality[name] = (float(cos.mean()), float(cos.min()))

    timings = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        modules = {name: make(threads) for name, (make, _) in built.items()}
        for setting, inputs in settings.items():
            calls = {name: (lambda m=m, b=inputs: m(**b)) for name, m in modules.items()}
            timings[(threads, setting)] = interleaved_latency(calls, "torch fp32", rounds=args.rounds)
            print(f"# timed {threads} threads, {setting}", flush=True)
    rows = []
    for name, (_, size) in built.items():
        row = {"variant": name, "size_mb": round(size, 1), "mean_cos": round(quality[name][0], 4),
               "min_cos": round(quality[name][1], 4)}
        for (threads, setting), timing in timings.items():
            row[f"{threads}t {setting}"] = f"{timing[name]['latency_ms']:.1f} ms ({timing[name]['speedup']:.2f}x)"
        rows.append(row)
    print(environment())
    print("build seconds:", json.dumps({k: round(v) for k, v in seconds.items()}))
    print(markdown(rows, list(rows[0])))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "timings": {f"{t}|{s}": v for (t, s), v in timings.items()},
                                         "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
