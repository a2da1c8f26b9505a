"""``fedcore-adapter inference`` (the seed's ``fc_inference``): outputs of saved models, and their costs.

``inference_model`` is a checkpoint folder, a ``.pt``/``.pth`` state-dict file,
or a folder holding several: a results folder gives every node checkpoint
under ``nodes/`` (pass ``<results>/final`` for the final model only), any other
folder every checkpoint or results folder and state-dict file directly in it; an exported
artifact (``model.onnx``, ``model.xml``, ``model.pt2`` of a deploy node) runs in its runtime.
Each checkpoint is rebuilt on a fresh ``model`` (no pickled modules) and run on the data
module's ``inference.split``; its outputs go to ``inference.output`` as
``scores[_<checkpoint>].<csv|parquet|pickle>`` (columns ``emb_*`` for a model's
``seq_encoder`` embeddings, else ``score_*``; ``target`` when labeled), and with
``n_batches_computational > 0`` latency, throughput and size are appended to
``computational.txt`` there.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import pandas as pd
import torch

from ..api import eval_computational_metrics, provides
from ..building import build_data, instantiate_target, load_pretrained
from ..checkpoint import MANIFEST_FILE
from ..composition import run_hydra_app
from ..data import call_model, limited, primary_output, resolve_device, runtime_device, split_batch, to_device
from ..deploy.artifacts import SUFFIXES, load_artifact
from ..errors import ConfigError, DataError
from ..nodes.toolkit import forward_hooks
from .common import STATE_SUFFIXES, plain, reporting_errors

FORMATS = {"csv": "csv", "parquet": "parquet", "pickle": "pkl"}
SPLITS = ("test", "val", "train")


def _order(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and not path.name.endswith(".partial") and \
        ((path / MANIFEST_FILE).exists() or (path / "final" / MANIFEST_FILE).exists())


def find_checkpoints(spec: str | Path) -> list[tuple[str, Path]]:
    """``[(id, path)]`` of what ``inference_model`` names; id is '' for a single model."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in SUFFIXES:  # an exported artifact
        return [("", path)]
    if path.is_file() and path.suffix.lower() in STATE_SUFFIXES or (path / MANIFEST_FILE).is_file():
        return [("", path)]
    if path.is_dir():
        folder = path / "nodes" if (path / "nodes").is_dir() else path  # a results folder: every node
        found = [p for p in sorted(folder.iterdir(), key=_order)
                 if _is_checkpoint(p) or (p.is_file() and p.suffix.lower() in STATE_SUFFIXES)]
        if found:
            return [(p.name if p.is_dir() else p.stem, p) for p in found]
    raise ConfigError(f"inference_model={str(spec)!r}: no checkpoints there (expected a checkpoint folder with "
                      f"manifest.json, a results folder, a .pt/.pth state-dict file, a model.onnx / model.xml / "
                      f"model.pt2 artifact, or a folder of these)")


def predict(model: Any, loader: Any, device: Any, limit: Optional[int], encoder_only: bool = True):
    """A DataFrame with one row per sample: ``emb_*`` / ``score_*`` columns, and ``target`` when labeled."""
    captured: list = []  # model.seq_encoder's output, when asked and present
    encoder = getattr(model, "seq_encoder", None) if encoder_only else None
    hooks = {encoder: lambda m, a, out: captured.append(out)} if encoder is not None else {}
    prefix = "emb" if encoder is not None else "score"
    outputs, targets = [], []
    model.eval()
    with forward_hooks(model, hooks):
        with torch.inference_mode():
            for batch in limited(loader, limit):
                inputs, target = split_batch(to_device(batch, device))
                out = call_model(model, inputs)
                out = primary_output(captured.pop() if captured else out).float()
                captured.clear()
                if out.dim() > 2:  # token-level outputs: mean over the real tokens
                    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                    mask = torch.ones(out.shape[:2], device=out.device) if mask is None else mask.to(out.dtype)
                    out = (out * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
                outputs.append(out.reshape(out.shape[0], -1).cpu())
                if target is not None:
                    targets.append(target.reshape(target.shape[0], -1)[:, 0].cpu())
    if not outputs:
        raise DataError("the inference loader yielded no batches")
    values = torch.cat(outputs).numpy()
    frame = pd.DataFrame(values, columns=[f"{prefix}_{i:04d}" for i in range(values.shape[1])])
    if targets and len(targets) == len(outputs):
        frame.insert(0, "target", torch.cat(targets).numpy())
    return frame


def save_scores(frame: Any, folder: Path, checkpoint_id: str, fmt: str) -> Path:
    """Write ``scores[_<id>].<ext>`` atomically."""
    path = folder / f"scores{'_' + checkpoint_id if checkpoint_id else ''}.{FORMATS[fmt]}"
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "csv":
        frame.to_csv(tmp, index=False)
    elif fmt == "parquet":
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_pickle(tmp)
    os.replace(tmp, path)
    return path


def _options(cfg: Mapping[str, Any]) -> tuple[dict, str, str, Optional[int]]:
    inference = dict(cfg.get("inference") or {})
    fmt = str(inference.get("format", "csv")).lower()
    if fmt not in FORMATS:
        raise ConfigError(f"inference.format={fmt!r} is not supported; allowed: {', '.join(FORMATS)}")
    split = str(inference.get("split", "test"))
    if split not in SPLITS:
        raise ConfigError(f"inference.split={split!r} is not a split; allowed: {', '.join(SPLITS)}")
    if not inference.get("output"):
        raise ConfigError("inference.output is required: the folder the scores are written to")
    limit = cfg.get("limit_predict_batches") or cfg.get({"test": "limit_test_batches", "val": "limit_val_batches",
                                                         "train": "limit_train_batches"}[split])
    return inference, fmt, split, limit


def run_inference(cfg: Mapping[str, Any]) -> list[Path]:
    """Run an inference config; returns the score files written."""
    cfg = plain(cfg)
    inference, fmt, split, limit = _options(cfg)
    checkpoints = find_checkpoints(str(cfg.get("inference_model") or ""))
    dm = build_data(cfg)
    if not provides(dm, f"{split}_dataloader"):
        raise DataError(f"inference.split={split}: data module {type(dm).__name__} has no {split}_dataloader()")
    for hook in ("prepare_data", "setup"):
        if callable(getattr(dm, hook, None)):
            getattr(dm, hook)(*(() if hook == "prepare_data" else ("predict",)))
    out = Path(str(inference["output"]))
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(str((cfg.get("common") or {}).get("device", "auto")))
    n_comp = int(cfg.get("n_batches_computational") or 0)
    written = []
    for checkpoint_id, path in checkpoints:
        if path.is_file() and path.suffix.lower() in SUFFIXES:
            model = load_artifact(path)
        else:
            model = load_pretrained(instantiate_target("model", cfg.get("model")), path, "inference_model")
        run_on = runtime_device(model, device)
        model.to(run_on)
        if n_comp > 0:
            eval_computational_metrics(model, getattr(dm, f"{split}_dataloader")(), out / "computational.txt",
                                       id=checkpoint_id, n_batches=n_comp)
        frame = predict(model, getattr(dm, f"{split}_dataloader")(), run_on, limit,
                        bool(inference.get("encoder_only", True)))
        written.append(save_scores(frame, out, checkpoint_id, fmt))
    return written


def _task(cfg) -> None:
    logging.getLogger("fedcore_adapter").setLevel(logging.INFO)
    for path in reporting_errors(cfg, lambda: run_inference(cfg)):
        print(f"written: {path}")


def main(argv: list[str]) -> None:
    run_hydra_app(_task, "inference", argv)
