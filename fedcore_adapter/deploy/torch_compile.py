"""torch.compile: ``torch.export`` + PT2E int8 with the x86 inductor quantizer (torchao), run by inductor.

The artifact ``model.pt2`` is a ``torch.export`` archive of the quantized graph (quantize /
dequantize ops around float ops); its input names ride along in the archive's extra files. The
runner compiles it with inductor's ``freezing`` (patched around each call: the compile is lazy),
which folds the weights into constants and fuses the quantize / dequantize patterns into oneDNN
int8 kernels (``onednn.qlinear_pointwise``, ``onednn.qconv_pointwise``...).
Conv1d layers are exported as the Conv2d they equal (a height of 1): torch 2.13's shape function of the
int8 1D convolution reads the kernel's width from the wrong axis of the prepacked weight, so the frozen
compile of a Conv1d whose output is reshaped (a CNN's flatten before its classifier) failed with
"shape '[64, 1280]' is invalid for input of size 114688". A graph with convolutions compiles once per
input shape (static). Where a frozen compile still fails, the runner runs the graph compiled unfrozen
(the quantize / dequantize ops as written, no int8 kernels) and says so in the log.

``compile: aot`` compiles the archive ahead of time instead, with AOTInductor (frozen: the same oneDNN
int8 kernels), into ``model.aoti/threads_<n>/<input shape>.pt2`` beside it: packages a serving process
loads and calls without compiling and without torch.compile's guard checks (about 0.3 ms per call on the
MNIST-1D CNN). Each is compiled for one input shape and one thread count: AOTInductor's int8 graphs
answered wrongly at any shape but the one they were traced at when compiled with dynamic dims (relative
error 0.5 on a BERT, 1.0 on the CNN; torch 2.13), and inductor writes its OpenMP loops for a fixed
thread count. The deploy node packages the shape of its example batch for its threads; a runner meeting
another shape or asked for other threads compiles that package once, in a temporary folder (a finished
result is not rewritten). A package holds its weights and its code for this CPU's instruction set.
"""
from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from ..errors import error_line
from ..metrics import fixed_threads
from .runner import Runner
from .signature import Positional, Signature

log = logging.getLogger("fedcore_adapter")

ARTIFACT = "model.pt2"
AOT_FOLDER = "model.aoti"  # AOTInductor packages of the archive: threads_<n>/<input shape>.pt2
_CONVOLUTIONS = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
                 torch.ops.aten.convolution.default}
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


# ops that act on each channel's values alone: as valid on [N, C, 1, L] as on [N, C, L]
_CHANNELWISE = {torch.ops.aten.batch_norm.default, torch.ops.aten.relu.default, torch.ops.aten.hardtanh.default,
                torch.ops.aten.leaky_relu.default, torch.ops.aten.gelu.default, torch.ops.aten.silu.default,
                torch.ops.aten.sigmoid.default, torch.ops.aten.tanh.default, torch.ops.aten.hardswish.default,
                torch.ops.aten.dropout.default}


def _explicit_padding(padding: Any, dilation: Sequence[int], kernel: int) -> Optional[list[int]]:
    """A conv1d's padding as a number per side (``"valid"``: 0, ``"same"``: half the dilated kernel), or None where
    ``"same"`` pads one side more than the other."""
    if not isinstance(padding, str):
        return list(padding)
    total = 0 if padding == "valid" else dilation[0] * (kernel - 1)
    return None if total % 2 else [total // 2]


def _source_meta(node: torch.fx.Node, module: Optional[type] = None) -> dict:
    """``node``'s source (the module it was called in: the quantizer finds its patterns by it), for the node that
    replaces it; ``module``: the innermost module's class replaced by this one."""
    meta = {k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")}
    stack = dict(meta.get("nn_module_stack") or {})
    if module is not None and stack:
        key, (fqn, cls) = list(stack.items())[-1]
        stack[key] = (fqn, module if isinstance(cls, type) else f"{module.__module__}.{module.__qualname__}")
        meta["nn_module_stack"] = stack
    return meta


def _conv1d_as_conv2d(graph: torch.fx.GraphModule) -> bool:
    """Rewrite ``graph`` in place: each ``conv1d`` computed as the ``conv2d`` it equals on ``[N, C, 1, L]`` (its
    weight ``[O, I, 1, K]``), the channel-wise ops after it (batch norm, activations) kept in 4D and the result
    squeezed back where anything else reads it: a Conv1d -> BatchNorm -> ReLU stack stays one 4D run (its batch
    norm still folds, its ReLU still fuses) and reaches inductor as the int8 2D convolutions it lowers correctly.
    True when anything was rewritten (the new nodes have no shapes yet: export the graph again)."""
    aten = torch.ops.aten
    lifted: dict[torch.fx.Node, torch.fx.Node] = {}  # a 3D node -> the same values as [N, C, 1, L]
    unsqueezed: dict[torch.fx.Node, torch.fx.Node] = {}  # a 3D input of the lifted nodes -> its 4D view
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.conv1d.default, aten.conv1d.padding) and node.args[1].op == "get_attr" \
                and len(node.args[1].users) == 1:  # a weight read elsewhere too keeps its shape
            x, weight, *rest = node.args
            bias, stride, padding, dilation, groups = (rest + [None, [1], [0], [1], 1][len(rest):])
            padding = _explicit_padding(padding, dilation, graph.get_parameter(weight.target).shape[-1])
            if padding is None:  # "same" with an odd total: padded unevenly, which conv2d cannot take
                continue
            owner, _, attr = weight.target.rpartition(".")
            holder = graph.get_submodule(owner) if owner else graph
            tensor = getattr(holder, attr)
            setattr(holder, attr, torch.nn.Parameter(tensor.detach().unsqueeze(2), tensor.requires_grad))
            with graph.graph.inserting_before(node):
                if x not in lifted and x not in unsqueezed:  # one 4D copy of a 3D input, however many read it
                    unsqueezed[x] = graph.graph.call_function(aten.unsqueeze.default, (x, 2))
                x4 = lifted.get(x) or unsqueezed[x]
                lifted[node] = graph.graph.call_function(aten.conv2d.default, (x4, weight, bias, [1, *stride],
                                                                              [0, *padding], [1, *dilation], groups))
            lifted[node].meta = _source_meta(node, torch.nn.Conv2d)
        elif node.target in _CHANNELWISE and node.args and node.args[0] in lifted:
            with graph.graph.inserting_before(node):
                lifted[node] = graph.graph.call_function(node.target, (lifted[node.args[0]], *node.args[1:]),
                                                         dict(node.kwargs))
            lifted[node].meta = _source_meta(node)
    for node, twin in lifted.items():
        with graph.graph.inserting_after(twin):
            node.replace_all_uses_with(graph.graph.call_function(aten.squeeze.dim, (twin, 2)))
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return bool(lifted)


def shape_key(tensors: Sequence[torch.Tensor]) -> str:
    """A package's name for these inputs: each input's shape, e.g. ``64x1x40`` or ``8x16_8x16``."""
    return "_".join("x".join(str(d) for d in t.shape) for t in tensors)


def package_path(archive: Path, threads: int, tensors: Sequence[torch.Tensor]) -> Path:
    """Where the AOTInductor package of ``archive`` for ``threads`` threads and these inputs' shapes lives."""
    return Path(archive).parent / AOT_FOLDER / f"threads_{threads}" / f"{shape_key(tensors)}.pt2"


def aot_package(program: torch.export.ExportedProgram, threads: int, tensors: Sequence[torch.Tensor],
                package: Path) -> Path:
    """Compile ``program`` ahead of time (AOTInductor, frozen: fused int8 kernels) for ``threads`` threads and
    the static shapes of ``tensors``, into the package ``package``."""
    from torch._inductor import aoti_compile_and_package
    from torch._inductor import config as inductor_config

    package.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        static = torch.export.export(program.module(), tuple(tensors))  # dynamic dims compile wrong int8 code
        # freezing applies only to graphs compiled without autograd; cpp.threads: the OpenMP loops' thread count
        with inductor_config.patch({"freezing": True, "cpp.threads": threads}), torch.no_grad():
            return Path(aoti_compile_and_package(static, package_path=str(package)))


def build(model: nn.Module, signature: Signature, example: Sequence[torch.Tensor], folder: Path, *, quantize: str,
          calibration: Iterable[Sequence[torch.Tensor]], compile: str = "jit", threads: Optional[int] = None
          ) -> list[Path]:
    """Write ``model.pt2`` (PT2E int8 unless ``quantize=none``), and with ``compile=aot`` its AOTInductor
    package for ``threads``; returns the files, the archive first."""
    program = _export(Positional(model, signature).eval(), signature, example)
    if quantize != "none":
        # lazy: torchao takes seconds to import (and prints warnings); only a quantized export needs it
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

        quantizer = x86.X86InductorQuantizer()
        quantizer.set_global(x86.get_default_x86_inductor_quantization_config(is_dynamic=quantize == "dynamic"))
        graph = _without_unused_weights(program.module())
        if _conv1d_as_conv2d(graph):
            graph = _export(graph, signature, example).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for tensors in calibration:
                prepared(*tensors)
        program = _export(_without_unused_weights(convert_pt2e(prepared)), signature, example)
    out = folder / ARTIFACT
    torch.export.save(program, str(out), extra_files={_SIGNATURE_FILE: json.dumps(signature.to_json())})
    if compile == "aot":
        threads = threads or torch.get_num_threads()
        return [out, aot_package(program, threads, example, package_path(out, threads, example))]
    return [out]


def _signature(path: Path) -> tuple[torch.export.ExportedProgram, Signature]:
    """The archive and the input names it was exported with (the runner is called as the model was)."""
    # the int8 graph's quantize / dequantize ops are registered by this import (PT2E registers them when it
    # quantizes; a process that only loads the archive has not run it)
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    extra = {_SIGNATURE_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    signature = Signature.from_json(json.loads(extra[_SIGNATURE_FILE])) if extra[_SIGNATURE_FILE] else \
        Signature(tuple(s.arg.name for s in program.graph_signature.input_specs
                        if s.kind == torch.export.graph_signature.InputKind.USER_INPUT), False)
    return program, signature


class CompiledRunner(Runner):
    runtime = "torch_compile"

    def __init__(self, path: Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None,
                 weight_dtype: str = "int8"):
        program, signature = _signature(path)
        module = program.module()
        # inductor prepacks int8 convolutions for static shapes only (and a dynamic recompile of a convolution on
        # one input channel fails its own stride check): a graph with convolutions is compiled once per input
        # shape, as a CNN is served (fixed batch shapes); one without keeps dynamic recompiles (token lengths vary)
        self.static = any(n.target in _CONVOLUTIONS for n in module.graph.nodes)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "compiled", self._compile(module))
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
                    self.fused = False  # a copy: the module's own compiled code is cached with the frozen one
                    object.__setattr__(self, "compiled", self._compile(copy.deepcopy(self._module)))
            return self.compiled(*tensors)

    def _compile(self, module: nn.Module) -> nn.Module:
        return torch.compile(module, dynamic=False if self.static else None)


class PackagedRunner(Runner):
    """Runs the archive's AOTInductor packages (``compile: aot``), one per input shape, for its thread count: those
    the deploy node compiled, others compiled at their first call (in a temporary folder). ``artifact_bytes``:
    the largest package it ran (a serving process loads one per shape), else the archive's."""

    runtime = "torch_compile"

    def __init__(self, path: Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None,
                 weight_dtype: str = "int8"):
        program, signature = _signature(path)
        object.__setattr__(self, "_program", program)
        super().__init__(path, [path], signature, threads or torch.get_num_threads(), weight_dtype, reference)
        self.packages: dict[str, Path] = {}
        self._sizes: dict[str, int] = {}
        object.__setattr__(self, "_loaded", {})
        self.fused = True  # packaged frozen: the int8 kernels

    def package_for(self, tensors: Sequence[torch.Tensor]) -> Path:
        """The package that runs these inputs: the results folder's, else compiled now in a temporary folder."""
        key = shape_key(tensors)
        if key not in self.packages:
            package = package_path(self.artifact, self.threads, tensors)
            if not package.is_file():
                log.info("torch_compile: compiling the AOTInductor package of %s for %s on %d threads",
                         self.artifact, key, self.threads)
                scratch = Path(tempfile.mkdtemp(prefix="fedcore_aoti_"))
                package = aot_package(self._program, self.threads, tensors, scratch / package.name)
            self.packages[key] = package
            self._sizes[key] = package.stat().st_size  # the node's folder is moved into place later
        return self.packages[key]

    def run(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        from torch._inductor import aoti_load_package

        key = shape_key(tensors)
        if key not in self._loaded:
            self._loaded[key] = aoti_load_package(str(self.package_for(tensors)))
        with fixed_threads(self.threads), torch.no_grad():
            return self._loaded[key](*tensors)

    def artifact_bytes(self) -> int:
        return max(self._sizes.values(), default=super().artifact_bytes())


def load(path: Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None,
         weight_dtype: str = "int8") -> Runner:
    """The archive's runner: its AOTInductor packages where the deploy node compiled them (``model.aoti/``
    beside it), else compiled by ``torch.compile`` at the first call of each shape."""
    path = Path(path)
    if (path.parent / AOT_FOLDER).is_dir():
        return PackagedRunner(path, threads, reference, weight_dtype)
    return CompiledRunner(path, threads, reference, weight_dtype)
