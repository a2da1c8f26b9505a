"""Measurement: the one place that defines every metric, its unit and method.

Columns (units in the names): ``params``, ``macs`` (multiply-accumulates per
sample), ``size_mb`` (bytes of the saved checkpoint / 2**20), ``latency_ms``
(median per batch), ``latency_ms_per_sample``, ``throughput_sps`` (samples per
second), ``accuracy``, ``loss``, ``sparsity``, ``device``, ``dtype``, and where the model runs:
``runtime`` (``torch`` eager, or the runtime of a deploy runner), ``threads``, ``batch_shape``. On unlabeled
batches, given the model the run started from (``original``), ``cosine``: the mean cosine of each sample's
output (mean-pooled over its real tokens) to that model's, the quality of an encoder compressed without labels.

A *runner* (``fedcore_adapter.deploy``) is a callable module running an exported artifact in
another runtime; it is timed and evaluated like any model, sized by ``artifact_bytes()``, and its
params/MACs are those of ``reference_model``, the float model it was exported from.
"""
from __future__ import annotations

import io
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .data import (batch_size, call_model, first_batch, is_batch_object, limited, primary_output, seeded, split_batch,
                   to_device)
from .losses import pooled_cosines, token_mask
from .steps import evaluate_steps, own_step

MB = 2**20


def _packed_weight(module: nn.Module) -> Optional[torch.Tensor]:
    """The packed (quantized) weight of a torch.ao quantized module, else None."""
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, (nn.Parameter, torch.Tensor)):
        try:
            w = weight()
        except Exception:  # noqa: BLE001 - not a packed-weight accessor
            return None
        return w if isinstance(w, torch.Tensor) else None
    return None


def _recurrent_int8(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{"weight": {...}, "bias": {...}}`` of torch's dynamic int8 GRU/LSTM (packed per layer), else empty."""
    from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase

    if isinstance(module, RNNBase) and module.dtype == torch.qint8:
        return module._weight_bias()
    return {}


def _weight_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight tensor of the model, float parameters and packed int8 weights alike."""
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            yield f"{module_name}.{name}", p
        for tensors in _recurrent_int8(module).values():
            for name, t in tensors.items():
                yield f"{module_name}.{name}", t
        packed = _packed_weight(module)
        if packed is not None:
            yield f"{module_name}.weight", packed
            bias = getattr(module, "bias", None)
            bias = bias() if callable(bias) else bias
            if isinstance(bias, torch.Tensor):
                yield f"{module_name}.bias", bias


def count_params(model: nn.Module) -> int:
    """Number of weights, counting packed quantized weights as parameters."""
    return sum(t.numel() for _, t in _weight_tensors(model))


def weight_dtype(model: nn.Module) -> str:
    """Dtype(s) of the weights, the one holding most elements first (e.g. ``int8+float32``)."""
    counts: dict[str, int] = {}
    for _, t in _weight_tensors(model):
        name = str(t.dtype).replace("torch.", "").replace("qint8", "int8").replace("quint8", "uint8")
        counts[name] = counts.get(name, 0) + t.numel()
    return "+".join(sorted(counts, key=counts.get, reverse=True)) or "none"


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among float weight matrices/kernels (dim > 1)."""
    zeros = total = 0
    for _, t in _weight_tensors(model):
        if t.dim() > 1 and t.is_floating_point():
            zeros += int((t == 0).sum())
            total += t.numel()
    return zeros / total if total else 0.0


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what a checkpoint of the model weighs."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _recurrent_macs(module: nn.Module, output: Any) -> int:
    """MACs of one call of a recurrent layer (float or int8) from shapes: per step, layer and direction, the
    matmuls of its input and hidden state with its gate weights (and projection)."""
    out = output[0] if isinstance(output, tuple) else output
    if not isinstance(out, torch.Tensor):
        return 0
    steps = out.shape[0] * out.shape[1] if out.dim() == 3 else out.shape[0]  # batched or unbatched sequence
    weights = _recurrent_int8(module).get("weight") or {n: p for n, p in module.named_parameters(recurse=False)
                                                        if p.dim() == 2}
    return steps * sum(w.shape[0] * w.shape[1] for w in weights.values())


def _quantized_module_macs(module: nn.Module, out: Any) -> int:
    """MACs of a quantized Linear/Conv/GRU/LSTM from shapes (flop_counter does not see quantized ops)."""
    if _recurrent_int8(module):
        return _recurrent_macs(module, out)
    w = _packed_weight(module)
    if w is None or not isinstance(out, torch.Tensor):
        return 0
    if w.is_quantized and w.qscheme() == torch.per_channel_affine_float_qparams:
        return 0  # int8 embedding (row-wise float qparams): a table lookup, no multiply-accumulates
    if w.dim() == 2:  # linear: every output element is in_features MACs
        return out.numel() * w.shape[1]
    return out.numel() * w[0].numel()  # conv: in_channels/groups * kernel per output element


@contextmanager
def _count_quantized_macs(model: nn.Module, counter: Any) -> Iterator[list[int]]:
    """MACs flop_counter misses: quantized layers, and float recurrent layers (whose fused CPU kernels it
    does not count) from their shapes in place of what it counted inside them."""
    total = [0]
    handles = []
    seen: list[int] = []

    def recurrent_done(module: nn.Module, _inp: Any, out: Any) -> None:
        counted = (counter.get_total_flops() - seen.pop()) // 2
        total[0] += _recurrent_macs(module, out) - counted

    for module in model.modules():
        if _packed_weight(module) is not None or _recurrent_int8(module):
            handles.append(module.register_forward_hook(
                lambda m, _inp, out: total.__setitem__(0, total[0] + _quantized_module_macs(m, out))))
        elif isinstance(module, nn.RNNBase):
            handles.append(module.register_forward_pre_hook(lambda m, _inp: seen.append(counter.get_total_flops())))
            handles.append(module.register_forward_hook(recurrent_done))
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates per sample (torch.utils.flop_counter; quantized and recurrent layers from shapes)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), _count_quantized_macs(model, counter) as quantized, counter:
        call_model(model, inputs)
    return int((counter.get_total_flops() // 2 + quantized[0]) // max(batch_size(inputs), 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def fixed_threads(n: Optional[int]) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def latency_ms(model: nn.Module, inputs: Any, device: torch.device, *, warmup: int = 3, repeats: int = 20,
               num_threads: Optional[int] = None, min_warmup_s: float = 0.25) -> list[float]:
    """Per-batch wall times in ms: untimed warm-up runs (at least ``warmup`` and ``min_warmup_s``),
    then ``repeats`` timed ones, CUDA synchronised after each."""
    timings = []
    with fixed_threads(num_threads), torch.inference_mode():
        start, done = time.perf_counter(), 0
        while done < warmup or (warmup and time.perf_counter() - start < min_warmup_s):
            call_model(model, inputs)
            _sync(device)
            done += 1
        for _ in range(repeats):
            start = time.perf_counter()
            call_model(model, inputs)
            _sync(device)
            timings.append((time.perf_counter() - start) * 1e3)
    return timings


def _accuracy_hits(logits: torch.Tensor, target: torch.Tensor) -> Optional[int]:
    if (logits.dim() == 2 and target.dim() == 1 and logits.shape[0] == target.shape[0]
            and not target.is_floating_point()):
        return int((logits.argmax(dim=1) == target).sum())
    return None


def evaluate(model: nn.Module, loader: Any, loss_fn: Optional[Callable], device: torch.device,
             limit_batches: Optional[int] = None, seed: int = 0,
             original: Optional[nn.Module] = None) -> dict[str, Optional[float]]:
    """Mean loss and accuracy over labeled batches (None on unlabeled data), the loader read seeded by ``seed``;
    with ``original`` (the model the run started from), ``cosine`` over unlabeled batches (:func:`_cosines`).

    A module defining its own step (Lightning / ptls) is evaluated on its own objective and
    validation metrics instead (:func:`fedcore_adapter.steps.evaluate_steps`).
    """
    if own_step(model) is not None:
        return evaluate_steps(model, loader, loss_fn, device, limit_batches, seed)
    was_training = model.training
    model.eval()
    if original is not None:
        original = original.to(device).eval()
    loss_sum = 0.0
    hits = seen = 0
    accuracy_ok = True
    labeled = False
    cosines: list[torch.Tensor] = []
    with torch.inference_mode(), seeded(seed):
        for batch in limited(loader, limit_batches):
            inputs, target = split_batch(to_device(batch, device))
            if target is None:
                got = _cosines(model, original, inputs) if original is not None else None
                if got is not None:
                    cosines.append(got)
                continue
            labeled = True
            out = primary_output(call_model(model, inputs))
            n = batch_size(inputs)
            if loss_fn is not None:
                loss_sum += float(loss_fn(out, target)) * n
            h = _accuracy_hits(out, target)
            accuracy_ok = accuracy_ok and h is not None
            hits += h or 0
            seen += n
    model.train(was_training)
    cosine = {"cosine": float(torch.cat(cosines).mean())} if cosines else {}
    if not labeled or seen == 0:
        return {"loss": None, "accuracy": None, **cosine}
    return {
        "loss": loss_sum / seen if loss_fn is not None else None,
        "accuracy": hits / seen if accuracy_ok else None,
        **cosine,
    }


def _cosines(model: nn.Module, original: nn.Module, inputs: Any) -> Optional[torch.Tensor]:
    """Per sample of an unlabeled batch: the cosine of ``model``'s output to ``original``'s, each mean-pooled
    over the sample's real tokens (``attention_mask``) or flattened (:func:`losses.pooled_cosines`); None when the
    outputs are no vectors per sample or differ in size (nothing to compare)."""
    out, ref = (primary_output(call_model(m, inputs)) for m in (model, original))
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor) or out.dim() < 2 \
            or out.shape != ref.shape:
        return None
    return pooled_cosines(out, ref, token_mask(inputs)).cpu()


def batch_shape(inputs: Any) -> str:
    """The shape of the first input tensor of a batch, e.g. ``32x128`` (a ptls PaddedBatch: of its first
    per-event feature, batch x padded length)."""
    if is_batch_object(inputs):
        payload = getattr(inputs, "payload", None)
        if isinstance(payload, dict):
            payload = {k: v for k, v in payload.items() if isinstance(v, torch.Tensor) and v.dim() >= 2}
        inputs = payload if isinstance(payload, (torch.Tensor, dict)) else {}
    first = inputs if isinstance(inputs, torch.Tensor) else next(
        (v for v in (inputs.values() if isinstance(inputs, dict) else inputs) if isinstance(v, torch.Tensor)), None)
    return "x".join(str(d) for d in first.shape) if first is not None else ""


def measure(model: nn.Module, loader: Any, *, device: torch.device, loss_fn: Optional[Callable] = None,
            limit_batches: Optional[int] = None, warmup: int = 3, repeats: int = 20,
            num_threads: Optional[int] = None, size_bytes: Optional[int] = None, seed: int = 0,
            original: Optional[nn.Module] = None) -> dict[str, Any]:
    """Every metric of ``model`` on ``loader``: the single measuring function of the project (``cosine`` to
    ``original`` on unlabeled data, :func:`evaluate`).

    ``size_bytes`` is the size of the checkpoint already written for this
    model; when absent the state dict is serialised in memory the same way.
    The loader is read with the random generators seeded by ``seed`` (restored
    after), so every row of a run measures the very same batches.
    """
    was_training = model.training
    model.eval()
    with seeded(seed):
        batch = first_batch(loader, "evaluation loader")
    inputs, _ = split_batch(to_device(batch, device))
    n = batch_size(inputs)
    times = latency_ms(model, inputs, device, warmup=warmup, repeats=repeats, num_threads=num_threads)
    median = statistics.median(times)
    runner = callable(getattr(model, "artifact_bytes", None))
    runtime = model.runtime if runner else "torch"
    reference = getattr(model, "reference_model", None) if runner else model
    if runner:
        size = model.artifact_bytes()
    else:
        size = size_bytes if size_bytes is not None else state_dict_bytes(model)
    row: dict[str, Any] = {
        "params": count_params(reference) if reference is not None else None,
        "macs": count_macs(reference, inputs) if reference is not None else None,
        "size_mb": size / MB,
        "latency_ms": median,
        "latency_ms_per_sample": median / n,
        "throughput_sps": n * 1e3 / median,
        "batch_size": n,
    }
    row.update(evaluate(model, loader, loss_fn, device, limit_batches, seed=seed, original=original))
    row.update({"sparsity": sparsity(reference) if reference is not None else None, "device": str(device),
                "dtype": model.weight_dtype if runner else weight_dtype(model), "runtime": runtime,
                "threads": model.threads if runner else num_threads or torch.get_num_threads(),
                "batch_shape": batch_shape(inputs)})
    model.train(was_training)
    return row
