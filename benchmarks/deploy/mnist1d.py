"""The MNIST-1D CNN in its deployment runtimes, side by side: torch fp32, our eager int8 (``ptq_static``), each
runtime's own int8 applied by hand, the same through the ``deploy`` node, and a pruned model + each runtime's int8.

    python -m benchmarks.deploy.mnist1d [--raw-epochs 30] [--prune 0.5] [--rounds 5]

RAW trains the fp32 model (``--raw-epochs``, seed 42); every other variant starts from it. Settings: batch 1 and
batch 256 (one test batch), 1 and 2 threads, every variant timed back to back in each round
(``benchmarks.timing.interleaved_latency``); speed-ups are medians over rounds of per-round ratios to torch fp32.
Accuracy: the 1000 test samples, through each runtime. Sizes: bytes of what each runtime loads.

- ``ORT int8 (by hand)``: ``torch.onnx.export`` + ``quantize_static`` (QDQ, per-channel, 8 training batches):
  ONNX Runtime's recipe for CNNs (its dynamic int8 runs convolutions as ConvInteger, slower).
- ``OpenVINO int8 (by hand)``: ``openvino.convert_model`` + ``nncf.quantize`` (default preset, 8 batches).
- ``pruned + deploy <runtime>``: the ``pruning`` node (``--prune`` of the channels, magnitude, 3 iterations,
  fine-tuned as in ``benchmarks.pruning.mnist1d``) then the ``deploy`` node.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcore_adapter import run_setup
from fedcore_adapter.deploy import load_artifact
from fedcore_adapter.metrics import evaluate
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
from fedcore_adapter.zoo.models import MNIST1DCNN

from benchmarks.common import environment, markdown
from benchmarks.timing import interleaved_latency


class Feed(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return torch.from_numpy(np.asarray(self.fn(x.numpy())))


def ort_by_hand(model: nn.Module, calibration: list, folder: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": x.numpy()} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    torch.onnx.export(model, (calibration[0],), str(fp32), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return int8


def ort_session(path: Path, threads: int) -> Feed:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Feed(lambda x: session.run(None, {"x": x})[0])


def ov_by_hand(model: nn.Module, calibration: list, folder: Path) -> Path:
    import nncf
    import openvino as ov

    ov_model = ov.convert_model(model, example_input=calibration[0])
    quantized = nncf.quantize(ov_model, nncf.Dataset([x.numpy() for x in calibration]),
                              subset_size=sum(len(x) for x in calibration))
    ov.save_model(quantized, str(folder / "int8.xml"), compress_to_fp16=False)
    return folder / "int8.xml"


def ov_session(path: Path, threads: int) -> Feed:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                           "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return Feed(lambda x: request.infer({0: x})[compiled.outputs[0]].copy())


def run_nodes(nodes: list[dict], model: nn.Module, dm, out: Path, seed: int):
    return run_setup({"name": "v", "common": {"measure": False, "seed": seed}, "nodes": nodes}, model, dm,
                     output_dir=out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--raw-epochs", type=int, default=30)
    parser.add_argument("--prune", type=float, default=0.5, help="0: leave out the pruned variants")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    dm = MNIST1DDataModule(seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="deploy_mnist1d_"))
    seconds = {}
    torch.manual_seed(args.seed)
    raw = run_nodes([{"kind": "training", "epochs": args.raw_epochs, "progress": False}], MNIST1DCNN(), dm,
                    tmp / "raw", args.seed)
    fp32 = raw.model.eval()
    built = {"torch fp32": (lambda t: fp32, (raw.output_dir / "final" / "state.pt").stat().st_size)}
    ours = run_nodes([{"kind": "ptq_static"}], fp32, dm, tmp / "ptq", args.seed)
    built["ours eager int8 (ptq_static)"] = (lambda t: ours.model,
                                             (ours.output_dir / "final" / "state.pt").stat().st_size)
    calibration = [x for i, (x, _) in zip(range(8), dm.train_dataloader())]
    ort_path = ort_by_hand(fp32, calibration, tmp)
    built["ORT int8 (by hand)"] = (lambda t: ort_session(ort_path, t), ort_path.stat().st_size)
    ov_path = ov_by_hand(fp32, calibration, tmp)
    built["OpenVINO int8 (by hand)"] = (lambda t: ov_session(ov_path, t),
                                        ov_path.stat().st_size + ov_path.with_suffix(".bin").stat().st_size)
    bases = [("", fp32)]
    if args.prune > 0:
        start = time.perf_counter()
        prune_node = {"kind": "pruning", "pruning_ratio": args.prune, "pruning_iterations": 3, "epochs": 5,
                      "learning_rate": 1e-3, "importance": "MagnitudeImportance", "importance_norm": 1,
                      "finetune_params": {"epochs": 20, "progress": False}}
        pruned = run_nodes([prune_node], fp32, dm, tmp / "pruned", args.seed)
        seconds["pruning node"] = time.perf_counter() - start
        built["pruned torch fp32"] = (lambda t: pruned.model,
                                      (pruned.output_dir / "final" / "state.pt").stat().st_size)
        bases.append(("pruned + ", pruned.model))
    for label, base in bases:
        for runtime in ("onnxruntime", "openvino"):
            node = {"kind": "deploy", "runtime": runtime, "quantize": "static"}
            result = run_nodes([node], base, dm, tmp / f"{label.strip(' +')}{runtime}", args.seed)
            folder = result.output_dir / "final"
            built[f"{label}deploy {runtime}"] = (lambda t, f=folder: load_artifact(f, threads=t),
                                                 result.model.artifact_bytes())
    x256 = next(iter(dm.test_dataloader()))[0]
    settings = {"batch 1": x256[:1], "batch 256": x256}
    timings = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        modules = {name: make(threads) for name, (make, _) in built.items()}
        for setting, x in settings.items():
            calls = {name: (lambda m=m, x=x: m(x)) for name, m in modules.items()}
            timings[(threads, setting)] = interleaved_latency(calls, "torch fp32", rounds=args.rounds,
                                                              per_round=10 if setting == "batch 1" else 3)
    torch.set_num_threads(2)
    rows = []
    base_acc = None
    for name, (make, size) in built.items():
        acc = evaluate(make(2), dm.test_dataloader(), None, torch.device("cpu"))["accuracy"]
        base_acc = acc if base_acc is None else base_acc
        row = {"variant": name, "size_kb": round(size / 1024, 1), "accuracy": acc,
               "delta_pt": round(100 * (acc - base_acc), 2)}
        for (threads, setting), timing in timings.items():
            row[f"{threads}t {setting}"] = f"{timing[name]['latency_ms']:.3g} ms ({timing[name]['speedup']:.2f}x)"
        rows.append(row)
    print(environment(), f"seed {args.seed}")
    print("build seconds:", json.dumps({k: round(v) for k, v in seconds.items()}))
    print(markdown(rows, list(rows[0])))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "timings": {f"{t}|{s}": v for (t, s), v in timings.items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
