"""torch.compile: ``torch.export`` + PT2E int8 with the x86 inductor quantizer (torchao), run by inductor.

The artifact ``model.pt2`` is a ``torch.export`` archive of the quantized graph (quantize /
dequantize ops around float ops); its input names ride along in the archive's extra files. The
runner compiles it with inductor's ``freezing`` (patched around each call: the compile is lazy),
which folds the weights into constants and fuses the quantize / dequantize patterns into oneDNN
int8 kernels (``onednn.qlinear_pointwise``...).
Where the frozen compile fails (torch 2.13 + torchao 0.18: Conv1d with stride gets a wrong output
length, "shape '[64, 1280]' is invalid for input of size 114688"), it runs the graph compiled
unfrozen (the quantize / dequantize ops as written, no int8 kernels) and says so in the log.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..errors import error_line
from ..metrics import fixed_threads
from .runner import Runner
from .signature import Positional, Signature

log = logging.getLogger("fedcore_adapter")

ARTIFACT = "model.pt2"
_SIGNATURE_FILE = "fedcore_signature.json"


def _export(module: nn.Module, signature: Signature, example: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
    dims = signature.dynamic_dims(example)
    shapes = tuple({d: torch.export.Dim.AUTO for d in ds} for ds in dims)
    if isinstance(module, Positional):  # forward(*tensors): the var-args are one input of the structure
        shapes = (shapes,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, tuple(example), dynamic_shapes=shapes)


def export_leaf(module: nn.Module, args: tuple, folder: Path, opset: int) -> None:
    signature = Signature.of(args if len(args) > 1 else args[0])
    _export(Positional(module, signature).eval(), signature, args)


def _without_unused_weights(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph`` without the ops whose results nothing uses and the weights nothing reads. Before quantizing: a BERT
    pooler's Linear -> Tanh that the returned hidden states leave unused, on which torchao's x86 quantizer fails
    ("list index out of range"); after: the float weights the int8 graph no longer reads (they would be saved
    beside their int8 copies)."""
    graph.graph.eliminate_dead_code()
    used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    for name, _ in list(graph.named_parameters()) + list(graph.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attr)
    graph.recompile()
    return graph


def build(model: nn.Module, signature: Signature, example: Sequence[torch.Tensor], folder: Path, *, quantize: str,
          calibration: Iterable[Sequence[torch.Tensor]]) -> list[Path]:
    """Write ``model.pt2`` (PT2E int8 unless ``quantize=none``); returns the files."""
    program = _export(Positional(model, signature).eval(), signature, example)
    if quantize != "none":
        # lazy: torchao takes seconds to import (and prints warnings); only a quantized export needs it
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

        quantizer = x86.X86InductorQuantizer()
        quantizer.set_global(x86.get_default_x86_inductor_quantization_config(is_dynamic=quantize == "dynamic"))
        prepared = prepare_pt2e(_without_unused_weights(program.module()), quantizer)
        with torch.no_grad():
            for tensors in calibration:
                prepared(*tensors)
        program = _export(_without_unused_weights(convert_pt2e(prepared)), signature, example)
    out = folder / ARTIFACT
    torch.export.save(program, str(out), extra_files={_SIGNATURE_FILE: json.dumps(signature.to_json())})
    return [out]


class CompiledRunner(Runner):
    runtime = "torch_compile"

    def __init__(self, path: Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None,
                 weight_dtype: str = "int8"):
        extra = {_SIGNATURE_FILE: ""}
        program = torch.export.load(str(path), extra_files=extra)
        signature = Signature.from_json(json.loads(extra[_SIGNATURE_FILE])) if extra[_SIGNATURE_FILE] else \
            Signature(tuple(s.arg.name for s in program.graph_signature.input_specs
                            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT), False)
        module = program.module()
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "compiled", torch.compile(module))
        super().__init__(path, [path], signature, threads or torch.get_num_threads(), weight_dtype, reference)
        self.fused = True  # frozen: int8 kernels; False once the frozen compile failed and the runner fell back

    def run(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        from torch._inductor import config as inductor_config

        with fixed_threads(self.threads), torch.no_grad():
            if self.fused:
                try:
                    with inductor_config.patch(freezing=True):
                        return self.compiled(*tensors)
                except Exception as err:  # noqa: BLE001 - inductor's frozen int8 lowering fails on some graphs
                    log.warning("torch_compile: the frozen (int8-fused) compile of %s failed (%s); running it "
                                "compiled without freezing", self.artifact.name, error_line(err, typed=True, limit=200))
                    self.fused = False
                    object.__setattr__(self, "compiled", torch.compile(self._module))
            return self.compiled(*tensors)

def load(path: Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None,
         weight_dtype: str = "int8") -> CompiledRunner:
    return CompiledRunner(Path(path), threads, reference, weight_dtype)
