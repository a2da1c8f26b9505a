"""Shared by the deployment benchmarks: OpenVINO's own int8 applied by hand, every variant timed in every
(threads, batch shape) cell in interleaved rounds, and the per-round comparisons against a runtime's own int8.

Sessions of hand-made artifacts are the package's runners (``deploy.load_artifact``): the same session
options as the ``deploy`` node's (ONNX Runtime: all graph optimisations, ``threads`` intra-op, 1 inter-op;
OpenVINO: ``INFERENCE_NUM_THREADS``, latency hint), so by hand and through the node differ only in the artifact.
"""
from __future__ import annotations

import copy
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from benchmarks.timing import time_call

RUNTIMES = ("onnxruntime", "openvino")  # timed by default; torch_compile on request (compiles per shape)
BY_HAND = {"onnxruntime": "ORT int8 (by hand)", "openvino": "OpenVINO int8 (by hand)",
           "torch_compile": "PT2E int8 + torch.compile (by hand)"}
# a timed target -> the deploy node's options: torch_compile_aot is the torch_compile runtime with compile: aot
# (AOTInductor packages), compared with the same runtime's own int8
TARGETS = {"torch_compile_aot": {"runtime": "torch_compile", "compile": "aot"}}


def deploy_options(target: str) -> dict:
    """The deploy node's fields for a timed target (a runtime, or ``torch_compile_aot``)."""
    return TARGETS.get(target, {"runtime": target})


def own_int8(target: str) -> str:
    """The variant name of the target's runtime's own int8 applied by hand."""
    return BY_HAND[deploy_options(target)["runtime"]]


def state_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def ov_by_hand(model: nn.Module, example_input: Any, calibration: list, folder: Path, transformer: bool,
               subset_size: Optional[int] = None) -> Path:
    """``openvino.convert_model`` + ``nncf.quantize`` (the transformer preset for attention models) on
    ``calibration`` (the runtime's feeds; ``subset_size`` default: all of them), saved as ``folder/int8.xml``:
    what an OpenVINO user deploys."""
    import nncf
    import openvino as ov

    ov_model = ov.convert_model(model, example_input=example_input)
    quantized = nncf.quantize(ov_model, nncf.Dataset(calibration), subset_size=subset_size or len(calibration),
                              model_type=nncf.ModelType.TRANSFORMER if transformer else None)
    ov.save_model(quantized, str(folder / "int8.xml"), compress_to_fp16=False)
    return folder / "int8.xml"


class CompiledByHand(nn.Module):
    """torchao's PT2E recipe for x86 CPUs, as its tutorial writes it (plus dead-code elimination, which MiniLM's
    unused pooler needs on torchao 0.18): ``torch.export``, ``prepare_pt2e`` with the
    ``X86InductorQuantizer`` (static, per-channel weights), calibration, ``convert_pt2e``, then ``torch.compile``
    with inductor's ``freezing`` on (which fuses the int8 patterns into oneDNN kernels): what a torch.compile
    user deploys. Called with the model's keyword inputs (``names``, in order) or positional ones; compiled on
    first call, with the thread count of that call baked into the kernels, so build one per thread count. Where
    the frozen compile fails (torch 2.13: a Conv1d whose output is reshaped), compiled without freezing, as a
    user would then run it: ``fused`` False, and one line printed."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], example: tuple, calibration: list[tuple]):
        super().__init__()
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        self.names = names
        shapes = tuple({d: torch.export.Dim.AUTO for d in range(t.dim())} for t in example)
        exported = torch.export.export(module.eval(), example, dynamic_shapes=shapes).module()
        exported.graph.eliminate_dead_code()  # BERT's pooler, unused: the x86 quantizer fails on its Linear -> Tanh
        exported.recompile()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for args in calibration:
                prepared(*args)
        converted = convert_pt2e(prepared)  # not registered as submodules: eval() must not reach the exported graph
        object.__setattr__(self, "converted", converted)
        object.__setattr__(self, "compiled", torch.compile(converted))
        self.fused = True

    def forward(self, *args: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config

        tensors = (*args, *(inputs[k] for k in self.names if k in inputs))
        with torch.no_grad():
            if self.fused:
                try:
                    with inductor_config.patch(freezing=True):
                        return self.compiled(*tensors)
                except Exception as err:  # noqa: BLE001 - reported, then run as a user could
                    print(f"# PT2E by hand: the frozen compile failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120]}); compiled without freezing", flush=True)
                    self.fused = False  # a copy: the converted graph's compiled code is cached with the frozen one
                    object.__setattr__(self, "compiled", torch.compile(copy.deepcopy(self.converted)))
            return self.compiled(*tensors)


def time_cells(variants: dict[str, Callable[[int], nn.Module]], settings: dict[str, Callable[[nn.Module], Any]],
               threads: list[int], rounds: int, per_round: Callable[[str], int], settle: float = 0.1,
               warmup: int = 2) -> dict[tuple[int, str, str], list[float]]:
    """Per (threads, setting, variant) the time of each round (ms, median of ``per_round(setting)`` calls).

    Every round times every cell: threads, then settings, then variants back to back, each after
    ``settle`` seconds of pause and one untimed call (``benchmarks.timing``: idle spinning worker threads
    of the variant before would otherwise slow the next one down). ``variants[name](threads)`` builds the
    module once per thread count; ``settings[name](module)`` is one call.
    """
    modules = {t: {name: make(t) for name, make in variants.items()} for t in threads}
    times: dict[tuple[int, str, str], list[float]] = {}
    with torch.inference_mode():
        for t in threads:
            torch.set_num_threads(t)
            for call in settings.values():
                for module in modules[t].values():
                    for _ in range(warmup):
                        call(module)
        for r in range(rounds):
            for t in threads:
                torch.set_num_threads(t)
                for setting, call in settings.items():
                    for name, module in modules[t].items():
                        fn = partial(call, module)
                        time.sleep(settle)
                        fn()
                        times.setdefault((t, setting, name), []).append(time_call(fn, per_round(setting)))
            print(f"# round {r + 1}/{rounds} timed", flush=True)
    return times


def ratio(times: dict, cell: tuple[int, str], variant: str, reference: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``variant``'s time / ``reference``'s time in the same round."""
    values = [a / b for a, b in zip(times[(*cell, variant)], times[(*cell, reference)])]
    return statistics.median(values), min(values), max(values)


def cells(times: dict) -> list[tuple[int, str]]:
    return list(dict.fromkeys((t, s) for t, s, _ in times))


def latency_rows(names: list[str], times: dict, baseline: str) -> list[dict]:
    """Per variant: each cell's median latency and median per-round speed-up over ``baseline``."""
    rows = []
    for name in names:
        row = {"variant": name}
        for cell in cells(times):
            speedup = 1 / ratio(times, cell, name, baseline)[0]
            row[f"{cell[0]}t {cell[1]}"] = f"{statistics.median(times[(*cell, name)]):.3g} ms ({speedup:.2f}x)"
        rows.append(row)
    return rows


def against_own_int8(times: dict, composites: dict[str, list[str]], qualified: set[str],
                     runtimes: tuple[str, ...] = RUNTIMES) -> tuple[list[dict], dict]:
    """Rows ``variant / runtime's own int8`` (median per-round latency ratio; < 1: faster) for the ``deploy``
    node on each runtime (parity) and each composite; and per runtime the best qualified composite with
    how many cells it is faster than the runtime's own int8 in."""
    rows, verdict = [], {}
    for runtime in runtimes:
        own = own_int8(runtime)
        candidates = [f"deploy {runtime}"] + composites.get(runtime, [])
        best: Optional[tuple[int, float, str]] = None
        for name in candidates:
            row = {"variant / own int8": f"{name} / {own}", "quality ok": name in qualified}
            medians = []
            for cell in cells(times):
                med, lo, hi = ratio(times, cell, name, own)
                medians.append(med)
                row[f"{cell[0]}t {cell[1]}"] = f"{med:.3f} ({lo:.2f}-{hi:.2f})"
            rows.append(row)
            if name in composites.get(runtime, []) and name in qualified:
                score = (sum(m < 1 for m in medians), -statistics.median(medians), name)
                best = max(best, score) if best else score
        if best:
            verdict[runtime] = {"composite": best[2], "faster_cells": best[0], "cells": len(cells(times))}
    return rows, verdict
