"""Which int8 backend runs fastest here: torch.ao (eager modules) vs torchao ``quantize_`` vs pt2e + Inductor.

    python -m benchmarks.studies.quant_backends [--models mlp cnn minilm] [--rounds 7] [--json out.json]

Models: a 1024->4096->1024 MLP at batch 64 (the anchor), the MNIST-1D CNN at
batch 256, all-MiniLM-L6-v2 at 32 x 128 tokens. Variants, timed side by side
(``quant_timing``), 2 threads:

- ``fp32`` / ``fp32 compiled``: the float model, eager and ``torch.compile``d
- ``torch.ao dynamic``: this project's ``ptq_dynamic`` modules (eager, no compile)
- ``torch.ao static fx``: this project's ``ptq_static`` (FX, fused; eager, no compile) -- CNN only
- ``torchao int8 dyn``: ``quantize_(Int8DynamicActivationInt8WeightConfig())``, eager, then compiled
- ``export archive (ours)``: the ``export`` step's ``model.pt2`` of ``torch.ao dynamic (ours)``,
  saved, loaded back and run eager (core aten ops: int8 GEMMs via ``aten._int_mm``)
- ``pt2e x86 static``: ``prepare_pt2e``/``convert_pt2e`` with ``X86InductorQuantizer``, compiled
  with freezing (the recipe Inductor lowers to int8 kernels)

Compile time is printed but excluded from latency (warm-up); ``size_mb`` is the
bytes of ``torch.save(state_dict)`` where the variant has one.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import environment, markdown
from benchmarks.timing import interleaved_latency



def state_mb(model: nn.Module) -> float | None:
    try:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return buffer.tell() / 2**20
    except Exception:  # noqa: BLE001 - compiled / exported programs have no plain state dict
        return None


def call(model, inputs):
    return (lambda: model(**inputs)) if isinstance(inputs, dict) else (lambda: model(inputs))


def compiled(model: nn.Module, inputs, freezing: bool = False):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = freezing
    fn = torch.compile(model)
    start = time.perf_counter()
    with torch.inference_mode():
        call(fn, inputs)()
    return fn, time.perf_counter() - start


def ours_dynamic(model: nn.Module, emb: bool = False) -> nn.Module:
    from fedcore_adapter.nodes.quantization.config import PTQDynamicConfig
    from fedcore_adapter.nodes.quantization.dynamic import quantize_dynamic_model
    from fedcore_adapter.nodes.quantization.selective import quantizable_layers

    work = copy.deepcopy(model).eval()
    config = PTQDynamicConfig(allow_emb=emb)
    layers = quantizable_layers(work, ["linear"] + ["embedding"] * emb)
    return quantize_dynamic_model(work, frozenset(), layers, config, {})[0]


def ours_static(model: nn.Module, batches: list) -> nn.Module:
    from fedcore_adapter.nodes.quantization.config import PTQStaticConfig
    from fedcore_adapter.nodes.quantization.selective import quantizable_layers
    from fedcore_adapter.nodes.quantization.static import quantize_static_model

    work = copy.deepcopy(model).eval()
    layers = quantizable_layers(work, ["linear", "conv"])
    return quantize_static_model(work, frozenset(), PTQStaticConfig(), layers, "fx", batches)[0]


def exported_archive(quantized: nn.Module, inputs) -> nn.Module:
    """``quantized`` through the ``export`` step's rewrite, ``torch.export.save``d and loaded back."""
    from fedcore_adapter.nodes.quantization.export import reference_model

    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
    program = torch.export.export(reference_model(quantized, inputs), args, kwargs)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer).module()


def torchao_dynamic(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    work = copy.deepcopy(model).eval()
    quantize_(work, Int8DynamicActivationInt8WeightConfig())
    return work


def pt2e_static(model: nn.Module, inputs, batches: list) -> nn.Module:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
    exported = torch.export.export(copy.deepcopy(model).eval(), args, kwargs).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for b in batches:
            if not torch.is_tensor(b) or b.shape == inputs.shape:  # exported for the latency batch's shape
                call(prepared, b)()
    return convert_pt2e(prepared)


def build(name: str):
    """``(model, latency inputs, calibration batches)`` of a benchmark model."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()
        x = torch.randn(64, 1024)
        return model, x, [torch.randn(64, 1024) for _ in range(4)]
    if name == "cnn":
        from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
        from fedcore_adapter.zoo.models import MNIST1DCNN

        dm = MNIST1DDataModule()
        model = MNIST1DCNN().eval()
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        model.train()
        for _ in range(5):  # trained a little, so BatchNorm and activation ranges are realistic
            for xb, yb in dm.train_dataloader():
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
        model.eval()
        return model, next(iter(dm.test_dataloader()))[0], [b[0] for b in dm.val_dataloader()]
    from fedcore_adapter.zoo.text import TextDataModule, load_minilm

    dm = TextDataModule(n_train=32, n_val=64, n_test=32)
    model = load_minilm()
    return model, next(iter(dm.test_dataloader())), list(dm.val_dataloader())


def variants(name: str, model, x, batches, compile_minilm: bool) -> dict:
    out = {"fp32": model}
    compile_times = {}
    heavy = name == "minilm" and not compile_minilm
    if not heavy:
        out["fp32 compiled"], compile_times["fp32 compiled"] = compiled(model, x)
    out["torch.ao dynamic (ours)"] = ours_dynamic(model)
    out["export archive (ours, dynamic)"] = exported_archive(out["torch.ao dynamic (ours)"], x)
    if name == "cnn":
        out["torch.ao static fx (ours)"] = ours_static(model, batches)
    try:
        ao = torchao_dynamic(model)
        out["torchao int8 dyn eager"] = ao
        if not heavy:
            out["torchao int8 dyn compiled"], compile_times["torchao int8 dyn compiled"] = compiled(ao, x)
    except Exception as err:  # noqa: BLE001 - report, keep measuring the rest
        print(f"{name}: torchao failed: {type(err).__name__}: {err}")
    if not heavy:
        try:
            pt2e = pt2e_static(model, x, batches)
            out["pt2e x86 static eager"] = pt2e
            out["pt2e x86 static compiled"], compile_times["pt2e x86 static compiled"] = compiled(pt2e, x, True)
        except Exception as err:  # noqa: BLE001
            print(f"{name}: pt2e failed: {type(err).__name__}: {str(err)[:300]}")
    return out, compile_times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "minilm"])
    parser.add_argument("--compile-minilm", action="store_true", help="also compile MiniLM variants (minutes)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        model, x, batches = build(name)
        models, compile_times = variants(name, model, x, batches, args.compile_minilm)
        timing = interleaved_latency({k: call(m, x) for k, m in models.items()}, "fp32", rounds=args.rounds,
                                     per_round=5 if name != "minilm" else 2)
        for k, m in models.items():
            rows.append({"model": name, "variant": k, "latency_ms": timing[k]["latency_ms"],
                         "speedup": timing[k]["speedup"],
                         "speedup_range": f"{timing[k]['speedup_min']:.2f}-{timing[k]['speedup_max']:.2f}",
                         "size_mb": state_mb(m) if "compiled" not in k else None,
                         "compile_s": compile_times.get(k)})
    print(environment())
    print(markdown(rows, list(rows[0])))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
