"""torch.compile: ``torch.export`` + PT2E int8 with the x86 inductor quantizer (torchao), run by inductor.

The artifact ``model.pt2`` is a ``torch.export`` archive of the quantized graph (quantize /
dequantize ops around float ops, which inductor fuses into int8 kernels when compiled); its input
names ride along in the archive's extra files.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .runner import Runner
from .signature import Positional, Signature

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
    """Drop the float weights the int8 graph no longer reads (they would be saved beside their int8 copies)."""
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
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

        quantizer = x86.X86InductorQuantizer()
        quantizer.set_global(x86.get_default_x86_inductor_quantization_config(is_dynamic=quantize == "dynamic"))
        prepared = prepare_pt2e(program.module(), quantizer)
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
        object.__setattr__(self, "compiled", torch.compile(program.module()))
        super().__init__(path, [path], signature, threads or torch.get_num_threads(), weight_dtype, reference)

    def run(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        from ..metrics import fixed_threads

        with fixed_threads(self.threads), torch.no_grad():
            return self.compiled(*tensors)


def load(path: Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None,
         weight_dtype: str = "int8") -> CompiledRunner:
    return CompiledRunner(Path(path), threads, reference, weight_dtype)
