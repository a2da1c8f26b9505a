"""The MNIST-1D CNN in its deployment runtimes, side by side in one run: torch fp32, our eager int8
(``ptq_static``), each runtime's own int8 applied by hand, our int8 through the ``deploy`` node on each runtime,
and the composites (pruned / low-rank CNNs from the composite chains, then the runtime's int8) on each runtime.

    python -m benchmarks.deploy.mnist1d [--raw-epochs 30] [--prune 0.5] [--composite-2 0.5] [--rounds 5]
        [--runtimes onnxruntime openvino torch_compile] [--aot]

RAW trains the fp32 model (``--raw-epochs``, seed 42); every other variant starts from it. Cells: 1 and 2 threads
x batch 1 and batch 256 (one test batch); every round times every cell and every variant back to back
(``benchmarks.deploy.common.time_cells``, a pause before each variant); figures are medians over rounds, ratios
medians of per-round ratios. Accuracy: the 1000 test samples, through each runtime. Sizes: bytes of what each
runtime loads.

- ``ORT int8 (by hand)``: ``torch.onnx.export`` + ``quantize_static`` (QDQ, per-channel, 8 training batches):
  ONNX Runtime's recipe for CNNs (its dynamic int8 runs convolutions as ConvInteger, slower).
- ``OpenVINO int8 (by hand)``: ``openvino.convert_model`` + ``nncf.quantize`` (default preset, 8 batches).
- ``PT2E int8 + torch.compile (by hand)`` (``--runtimes ... torch_compile``): torchao's PT2E recipe for x86
  (``benchmarks.deploy.common.CompiledByHand``, 2 training batches as the node calibrates), compiled frozen;
  where that compile fails it runs unfrozen and the run says so. Beside it ``torch fp32 + torch.compile``: the
  ``deploy`` node with ``quantize: none`` (the float model compiled frozen), the float baseline of that runtime.
  Each variant compiles once per thread count and input shape (batch 1 first: the batch-256 compile stays static).
  ``--aot`` adds ``deploy torch_compile_aot``: the same runtime with ``compile: aot`` (AOTInductor packages, one
  per thread count and input shape, called without torch.compile's guards), for the node and each composite.
- ``deploy <runtime>``: the ``deploy`` node (``quantize: static``) on the fp32 model (parity target: within 5 %
  of the runtime's own int8 at equal or better accuracy).
- composites (target: faster than the runtime's own int8 within 0.5 pt of fp32's accuracy), then ``deploy``:
  ``pruned <r>``: the ``pruning`` node (``--prune`` of the channels, magnitude, 3 iterations, fine-tuned);
  ``COMPOSITE_2 <r>``: the named setup's chain after its training node (low-rank, pruning at ``--composite-2``,
  low-rank), as ``fedcore-adapter setup=COMPOSITE_2 nodes.2.pruning_ratio=<r>`` runs it.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fedcore_adapter import run_setup
from fedcore_adapter.deploy import load_artifact
from fedcore_adapter.metrics import evaluate
from fedcore_adapter.setups import setup_source
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
from fedcore_adapter.zoo.models import MNIST1DCNN

from benchmarks.common import environment, markdown
from benchmarks.deploy.common import (BY_HAND, RUNTIMES, CompiledByHand, against_own_int8, deploy_options,
                                      latency_rows, ov_by_hand, state_bytes, time_cells)


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


def run_nodes(nodes: list[dict], model: nn.Module, dm, out: Path, seed: int, limit: int | None = None):
    common = {"measure": False, "seed": seed} | ({"limit_train_batches": limit} if limit else {})
    return run_setup({"name": "v", "common": common, "nodes": nodes}, model, dm, output_dir=out)


def composite_chains(prune: float, composite_2: float) -> dict[str, list[dict]]:
    """The float chains whose models the runtimes quantize (name -> nodes)."""
    chains = {}
    if prune > 0:
        chains[f"pruned {prune:g}"] = [{"kind": "pruning", "pruning_ratio": prune, "pruning_iterations": 3,
                                        "epochs": 5, "learning_rate": 1e-3, "importance": "MagnitudeImportance",
                                        "importance_norm": 1,
                                        "finetune_params": {"epochs": 20, "progress": False}}]
    if composite_2 > 0:
        nodes = copy.deepcopy(setup_source("COMPOSITE_2")[0]["nodes"][1:])  # after its training node
        nodes[1]["pruning_ratio"] = composite_2
        chains[f"COMPOSITE_2 {composite_2:g}"] = nodes
    return chains


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--raw-epochs", type=int, default=30)
    parser.add_argument("--prune", type=float, default=0.5, help="pruned composite's ratio (0: left out)")
    parser.add_argument("--composite-2", type=float, default=0.5,
                        help="COMPOSITE_2 chain's pruning ratio (0: left out)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--limit-batches", type=int, help="training batches per epoch (a smoke run)")
    parser.add_argument("--settle", type=float, default=0.1, help="seconds of pause before each timed variant")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=sorted(BY_HAND),
                        help="runtimes timed (own int8 by hand, the deploy node, composites)")
    parser.add_argument("--aot", action="store_true",
                        help="with torch_compile: its deploy node with compile: aot too (torch_compile_aot)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    dm = MNIST1DDataModule(seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="deploy_mnist1d_"))
    seconds = {}
    torch.manual_seed(args.seed)
    raw = run_nodes([{"kind": "training", "epochs": args.raw_epochs, "progress": False}], MNIST1DCNN(), dm,
                    tmp / "raw", args.seed, args.limit_batches)
    fp32 = raw.model.eval()
    built = {"torch fp32": (lambda t: fp32, (raw.output_dir / "final" / "state.pt").stat().st_size)}
    ours = run_nodes([{"kind": "ptq_static"}], fp32, dm, tmp / "ptq", args.seed)
    built["ours eager int8 (ptq_static)"] = (lambda t: ours.model,
                                             (ours.output_dir / "final" / "state.pt").stat().st_size)
    calibration = [x for i, (x, _) in zip(range(8), dm.train_dataloader())]
    if "onnxruntime" in args.runtimes:
        ort_path = ort_by_hand(fp32, calibration, tmp)
        built[BY_HAND["onnxruntime"]] = (lambda t: load_artifact(ort_path, threads=t), ort_path.stat().st_size)
    if "openvino" in args.runtimes:
        ov_path = ov_by_hand(fp32, calibration[0], [x.numpy() for x in calibration], tmp, transformer=False,
                             subset_size=sum(len(x) for x in calibration))
        built[BY_HAND["openvino"]] = (lambda t: load_artifact(ov_path, threads=t),
                                      ov_path.stat().st_size + ov_path.with_suffix(".bin").stat().st_size)
    if "torch_compile" in args.runtimes:
        def by_hand(threads: int) -> CompiledByHand:  # as the deploy node calibrates: 2 training batches
            return CompiledByHand(fp32, (), (calibration[0],), [(x,) for x in calibration[:2]])

        built[BY_HAND["torch_compile"]] = (by_hand, state_bytes(by_hand(2).converted))
        float_compiled = run_nodes([{"kind": "deploy", "runtime": "torch_compile", "quantize": "none"}], fp32, dm,
                                   tmp / "compiled_fp32", args.seed).output_dir / "final"
        built["torch fp32 + torch.compile"] = (lambda t: load_artifact(float_compiled, threads=t),
                                               load_artifact(float_compiled).artifact_bytes())
    bases = [("", fp32)]
    for name, nodes in composite_chains(args.prune, args.composite_2).items():
        start = time.perf_counter()
        result = run_nodes(nodes, fp32, dm, tmp / name.replace(" ", "_"), args.seed, args.limit_batches)
        seconds[name] = time.perf_counter() - start
        built[f"{name} torch fp32"] = (lambda t, m=result.model: m,
                                       (result.output_dir / "final" / "state.pt").stat().st_size)
        bases.append((f"{name} + ", result.model))
    composites: dict[str, list[str]] = {}
    targets = list(args.runtimes) + (["torch_compile_aot"] if args.aot and "torch_compile" in args.runtimes else [])
    for label, base in bases:
        for runtime in targets:
            name = f"{label}deploy {runtime}"
            node = {"kind": "deploy", **deploy_options(runtime), "quantize": "static"}
            result = run_nodes([node], base, dm, tmp / name.replace(" ", "_").replace("+", ""), args.seed)
            folder = result.output_dir / "final"
            built[name] = (lambda t, f=folder: load_artifact(f, threads=t), result.model.artifact_bytes())
            if label:
                composites.setdefault(runtime, []).append(name)
    x256 = next(iter(dm.test_dataloader()))[0]
    settings = {"batch 1": x256[:1], "batch 256": x256}
    evaluated = {name: make(2) for name, (make, _) in built.items()}
    accuracy = {name: evaluate(module, dm.test_dataloader(), None, torch.device("cpu"))["accuracy"]
                for name, module in evaluated.items()}
    unfused = [name for name, module in evaluated.items() if getattr(module, "fused", True) is False]
    times = time_cells({name: make for name, (make, _) in built.items()},
                       {setting: (lambda m, x=x: m(x)) for setting, x in settings.items()}, args.threads, args.rounds,
                       per_round=lambda setting: 10 if setting == "batch 1" else 3, settle=args.settle)
    torch.set_num_threads(2)
    base_acc = accuracy["torch fp32"]
    rows = [{"variant": name, "size_kb": round(size / 1024, 1), "accuracy": accuracy[name],
             "delta_pt": round(100 * (accuracy[name] - base_acc), 2)} | row
            for (name, (_, size)), row in zip(built.items(), latency_rows(list(built), times, "torch fp32"))]
    qualified = {name for name, acc in accuracy.items() if acc >= base_acc - 0.005}
    own, verdict = against_own_int8(times, composites, qualified, tuple(targets))
    print(environment(), f"seed {args.seed}")
    print("build seconds:", json.dumps({k: round(v) for k, v in seconds.items()}))
    print(markdown(rows, list(rows[0])))
    print("\nlatency / the runtime's own int8 (median of per-round ratios, range; < 1: faster):")
    print(markdown(own, list(own[0])))
    print("best composite within 0.5 pt of fp32, per runtime:", json.dumps(verdict))
    if unfused:
        print("compiled without freezing (float kernels; the frozen int8 compile failed):", ", ".join(unfused))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "against_own_int8": own, "verdict": verdict,
                                         "times": {"|".join(map(str, k)): v for k, v in times.items()},
                                         "seconds": seconds, "unfused": unfused}, indent=2))


if __name__ == "__main__":
    main()
