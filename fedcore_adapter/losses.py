"""Finding the task loss (the seed's precedence, config-given losses) and the distillation losses."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, error_line
from .user_code import import_problem, importable_from_working_directory


def instantiate_loss(spec: Any) -> Callable:
    """A loss from an import path (``'torch.nn.MSELoss'``), a ``{_target_: ...}`` mapping, or a callable."""
    if callable(spec):
        return spec
    from hydra.utils import get_object, instantiate

    importable_from_working_directory()
    try:
        if isinstance(spec, str):
            obj = get_object(spec)
            return obj() if isinstance(obj, type) else obj
        if isinstance(spec, dict) and "_target_" in spec:
            obj = instantiate(spec)
            return obj() if isinstance(obj, type) else obj
    except Exception as err:  # noqa: BLE001 - turned into a one-line config error
        target = spec if isinstance(spec, str) else spec.get("_target_") if isinstance(spec, dict) else None
        reason = (import_problem(target) if target else None) or error_line(err, typed=False)
        raise ConfigError(f"loss {spec!r} cannot be built: {reason}") from None
    raise ConfigError(f"loss must be an import path or a mapping with _target_ (got {spec!r})")


def find_loss(model: nn.Module, loss: Optional[Any] = None, conf_loss: Optional[Any] = None) -> Callable:
    """The task loss: ``loss`` if given, else ``model.loss``, ``model._loss``, the config's loss, cross-entropy."""
    for candidate in (loss, getattr(model, "loss", None), getattr(model, "_loss", None)):
        if candidate is not None:
            return instantiate_loss(candidate)
    if conf_loss is not None:
        return instantiate_loss(conf_loss)
    return nn.CrossEntropyLoss()


def token_mask(inputs: Any) -> Optional[torch.Tensor]:
    """The ``attention_mask`` of a Hugging Face style dict batch, else None."""
    return inputs.get("attention_mask") if isinstance(inputs, Mapping) else None


def distillation_mse(student_out: torch.Tensor, teacher_out: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Loss used on unlabeled batches: match the teacher's output.

    With an ``attention_mask`` (batch x tokens) and per-token outputs, padded positions are left
    out: they carry no meaning and would otherwise dominate the loss on short sentences.
    """
    diff = (student_out.float() - teacher_out.float()).pow(2)
    if attention_mask is None or diff.dim() < 2 or tuple(diff.shape[:2]) != tuple(attention_mask.shape):
        return diff.mean()
    mask = attention_mask.to(diff.dtype).reshape(*attention_mask.shape, *([1] * (diff.dim() - 2)))
    return (diff * mask).sum() / (mask.sum() * diff[0, 0].numel()).clamp(min=1)


def pooled_outputs(outputs: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One vector per sample: per-token outputs (batch x tokens x ...) with a matching ``attention_mask``
    mean-pooled over the real tokens (a sentence embedding), any other output flattened per sample."""
    if outputs.dim() < 2:
        raise ValueError(f"a cosine needs a vector per sample; the output has shape {tuple(outputs.shape)}")
    outputs = outputs.float()
    if attention_mask is not None and outputs.dim() >= 3 and tuple(outputs.shape[:2]) == tuple(attention_mask.shape):
        mask = attention_mask.to(outputs.dtype).reshape(*attention_mask.shape, *([1] * (outputs.dim() - 2)))
        outputs = (outputs * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return outputs.flatten(1)


def pooled_cosines(student_out: torch.Tensor, teacher_out: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per sample, ``cos(student, teacher)`` of the vectors of :func:`pooled_outputs`: for a text encoder, the
    cosine of the mean-pooled sentence embeddings (what their quality is judged by)."""
    return F.cosine_similarity(pooled_outputs(student_out, attention_mask),
                               pooled_outputs(teacher_out, attention_mask), dim=1)


def pooled_cosine_distance(student_out: torch.Tensor, teacher_out: torch.Tensor,
                           attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over the batch of ``1 - cos(student, teacher)`` (:func:`pooled_cosines`)."""
    return 1 - pooled_cosines(student_out, teacher_out, attention_mask).mean()


def unlabeled_distillation(student_out: torch.Tensor, teacher_out: torch.Tensor,
                           attention_mask: Optional[torch.Tensor] = None, loss: str = "mse",
                           mse_weight: float = 0.0) -> torch.Tensor:
    """What an unlabeled batch learns from the teacher (``TrainParams.unlabeled_loss``): ``mse`` of the outputs
    (padding masked out), or ``cosine``: :func:`pooled_cosine_distance` plus ``mse_weight`` x that MSE."""
    if loss == "mse":
        return distillation_mse(student_out, teacher_out, attention_mask)
    value = pooled_cosine_distance(student_out, teacher_out, attention_mask)
    if mse_weight:
        value = value + mse_weight * distillation_mse(student_out, teacher_out, attention_mask)
    return value


def soft_target_kl(student_out: torch.Tensor, teacher_out: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation term: ``T^2 KL(teacher || student)`` on temperature-softened class scores."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student_out.float() / t, dim=-1),
                            F.log_softmax(teacher_out.float() / t, dim=-1), reduction="batchmean", log_target=True)


def labeled_distillation(student_out: torch.Tensor, teacher_out: torch.Tensor, target: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """Distillation on a labeled batch: soft targets for class labels, output MSE for real-valued targets."""
    if target.is_floating_point() or student_out.dim() < 2:
        return distillation_mse(student_out, teacher_out)
    return soft_target_kl(student_out, teacher_out, temperature)
