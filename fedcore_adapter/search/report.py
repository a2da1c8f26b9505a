"""What a search leaves behind: ``trials.csv``, ``pareto.csv``, ``pareto.png`` (its reference points in
``reference_points.csv``) and each Pareto trial's setup as a YAML file that ``setup=<file>`` runs again (with
the search's ``pretrained=``)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import yaml
from optuna._hypervolume import compute_hypervolume

from ..plots import pyplot
from ..results import write_text

# the objectives measured per split: val_<name> on the validation split, what the search selects on (constraint,
# objectives, front); <name> on the test split, the held-out figure (as in every run's metrics rows). The other
# objectives (macs, params, size_mb, latency_ms[_per_sample], throughput_sps) do not depend on a split.
SPLIT_METRICS = ("accuracy", "loss")
# the columns of the model measured (every objective of search.config.OBJECTIVES among them)
_FIGURES = ["val_accuracy", "val_accuracy_drop_pt", "accuracy", "accuracy_drop_pt", "val_loss", "loss", "macs",
            "macs_reduction", "params", "params_reduction", "size_mb", "latency_ms", "latency_ms_per_sample",
            "latency_ratio", "throughput_sps"]
SUMMARY = ["trial", "state", "chain", "start_node", "continues", "same_as", *_FIGURES, "feasible", "wall_s", "epochs",
           "epochs_reused", "worker", "output_dir", "error"]
# reference_points.csv: the points pareto.png draws for reference (plotted_split: the split of the accuracy / loss
# drawn)
REFERENCE_COLUMNS = ["setup", "folder", *_FIGURES[:6], "plotted_split", "val_note", *_FIGURES[6:]]


def split_metrics(quality: str = "accuracy") -> tuple[str, ...]:
    """The metrics measured per split: accuracy, loss and the search's quality (``search.quality``)."""
    return SPLIT_METRICS if quality in SPLIT_METRICS else (*SPLIT_METRICS, quality)


def _quality_columns(quality: str) -> list[str]:
    return [] if quality in SPLIT_METRICS else [f"val_{quality}", f"val_{quality}_drop_pt", quality,
                                                f"{quality}_drop_pt"]


def _after_accuracy(columns: list[str], quality: str) -> list[str]:
    """``columns`` with the quality's columns inserted after ``accuracy_drop_pt``."""
    i = columns.index("accuracy_drop_pt") + 1
    return [*columns[:i], *_quality_columns(quality), *columns[i:]]


def summary_columns(quality: str = "accuracy") -> list[str]:
    """The leading columns of trials.csv / pareto.csv: ``SUMMARY``, the quality's after accuracy's."""
    return _after_accuracy(SUMMARY, quality)


def reference_columns(quality: str = "accuracy") -> list[str]:
    """The columns of reference_points.csv (``REFERENCE_COLUMNS``, the quality's after accuracy's)."""
    return _after_accuracy(REFERENCE_COLUMNS, quality)


def _reduction(reference: Optional[float], value: Optional[float]) -> Optional[float]:
    return reference / value if isinstance(reference, (int, float)) and isinstance(value, (int, float)) and value \
        else None


def _drop_pt(reference: Optional[float], value: Optional[float]) -> Optional[float]:
    return (reference - value) * 100 if isinstance(reference, (int, float)) and isinstance(value, (int, float)) \
        else None


def _measured(last: dict, val: Mapping[str, Any], reference: dict, quality: str = "accuracy") -> dict:
    """The figures of a measured model: validation accuracy, loss and quality (``val``), its last metrics row (test
    split), the drops and reductions against the search's reference."""
    ref = reference.get("row") or {}
    q = {} if quality in SPLIT_METRICS else {
        f"val_{quality}": val.get(f"val_{quality}"),
        f"val_{quality}_drop_pt": _drop_pt(reference.get(f"val_{quality}"), val.get(f"val_{quality}")),
        quality: last.get(quality), f"{quality}_drop_pt": _drop_pt(ref.get(quality), last.get(quality))}
    return {**q, "val_accuracy": val.get("val_accuracy"),
            "val_accuracy_drop_pt": _drop_pt(reference.get("val_accuracy"), val.get("val_accuracy")),
            "val_loss": val.get("val_loss"),
            **{k: last.get(k) for k in ("accuracy", "loss", "macs", "params", "size_mb", "latency_ms",
                                        "latency_ms_per_sample", "throughput_sps")},
            "accuracy_drop_pt": _drop_pt(ref.get("accuracy"), last.get("accuracy")),
            "macs_reduction": _reduction(ref.get("macs"), last.get("macs")),
            "params_reduction": _reduction(ref.get("params"), last.get("params")),
            "latency_ratio": _reduction(ref.get("latency_ms"), last.get("latency_ms"))}


def trial_row(number: int, state: str, attrs: dict, params: dict, reference: dict,
              quality: str = "accuracy") -> dict:
    """One line of trials.csv: the trial's validation accuracy, loss and quality, its last measured row (test
    split), the drops and reductions against the reference, its params."""
    row = {"trial": number, "state": state, "chain": attrs.get("chain"), "start_node": attrs.get("start_node"),
           "continues": attrs.get("continues"), "same_as": attrs.get("same_as"),
           **_measured(attrs.get("metrics") or {}, attrs, reference, quality),
           "feasible": attrs.get("feasible"), "wall_s": attrs.get("wall_s"), "epochs": attrs.get("epochs"),
           "epochs_reused": attrs.get("epochs_reused"), "worker": attrs.get("worker"),
           "output_dir": attrs.get("output_dir"), "error": attrs.get("error") or attrs.get("reason")}
    row.update({f"param:{k}": round(v, 10) if isinstance(v, float) else v  # grid points as written: 0.45,
                for k, v in sorted(params.items())})  # not Optuna's 0.45000000000000007
    return row


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str] = SUMMARY) -> None:
    columns = list(columns)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def setup_yaml(name: str, common: dict, nodes: list[dict], command: str, metrics: dict) -> str:
    """A setup file of one trial's whole chain, with how to run it again and what it measured."""
    head = ["# Found by fedcore-adapter search; run it again with:", f"#   {command}",
            "# measured in the search: " + ", ".join(f"{k}={v:.6g}" for k, v in metrics.items()
                                                    if isinstance(v, (int, float)))]
    body = yaml.safe_dump({"name": name, "description": "a Pareto trial of a search", "common": common,
                           "nodes": nodes}, sort_keys=False)
    return "\n".join(head) + "\n" + body


def reference_rows(folders: Iterable[Path], measured: dict, reference: dict, quality: str = "accuracy") -> list[dict]:
    """The rows of ``reference_points.csv``: the search's uncompressed reference, then the final row of each
    completed results folder given (the named setups' runs) with its validation accuracy and loss as the search
    measured them (``measured[<folder>]``; ``val_note`` says why it is missing)."""
    out = [{"setup": "uncompressed", "folder": reference.get("output_dir"),
            **_measured(reference.get("row") or {}, reference, reference, quality),
            "val_note": None if isinstance(reference.get(f"val_{quality}"), (int, float)) else "not measured"}]
    for folder in folders:
        try:
            rows = json.loads((Path(folder) / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if not rows:
            continue
        got = measured.get(str(folder)) or {}
        val = got.get(f"val_{quality}")
        note = None if isinstance(val, (int, float)) else got.get("error") or (
            "no validation loader" if got.get("val_split") is False else "not measured")
        out.append({"setup": Path(folder).name, "folder": str(folder), **_measured(rows[-1], got, reference, quality),
                    "val_note": note})
    return out


def figure_points(rows: Sequence[dict], objectives: Sequence[str], split: str, quality: str = "accuracy"
                  ) -> list[dict]:
    """What ``pareto.png`` draws for reference ``rows``: ``setup``, ``x``, ``y`` on the first two objectives,
    and ``split``. On the validation split, accuracy and loss are the row's ``val_accuracy`` / ``val_loss``; a row
    without one is drawn with its test figure, ``split: test`` (a different marker, named so in the legend); a row
    missing an objective is left out."""
    out = []
    for row in rows:
        values, point_split = [], split
        for name, column in zip(objectives[:2], plotted_columns(objectives, split, quality)):
            value = row.get(column)
            if column != name and not isinstance(value, (int, float)):
                value, point_split = row.get(name), "test"
            values.append(value)
        if len(values) == 2 and all(isinstance(v, (int, float)) for v in values):
            out.append({"setup": row["setup"], "x": values[0], "y": values[1], "split": point_split})
    return out


def plotted_columns(objectives: Sequence[str], split: str, quality: str = "accuracy") -> list[str]:
    """The columns ``pareto.png`` draws for the first two objectives: on the validation split, accuracy, loss and
    the quality are ``val_accuracy`` / ``val_loss`` / ``val_<quality>`` (what the trials are selected on)."""
    per_split = split_metrics(quality)
    return [f"val_{o}" if o in per_split and split == "validation" else o for o in objectives[:2]]


def axis_label(name: str, column: str, quality: str = "accuracy") -> str:
    """``accuracy (validation split)`` / ``loss (test split)``...; other metrics as they are."""
    if name not in split_metrics(quality):
        return name
    return f"{name} ({'validation' if column == f'val_{name}' else 'test'} split)"


def plot_front(path: Path, trials: Sequence[dict], front: Sequence[dict], objectives: Sequence[str],
               references: Sequence[dict], line: Optional[float], split: str, quality: str = "accuracy") -> bool:
    """``pareto.png``: every finished trial on the first two objectives (accuracy and loss on ``split``, the one
    the search selects on), the front, and the reference points of :func:`figure_points` (the uncompressed model,
    the named setups' runs)."""
    if len(objectives) < 2:
        return False
    plt = pyplot()
    (ox, oy), (x, y) = objectives[:2], plotted_columns(objectives, split, quality)
    fig, ax = plt.subplots(figsize=(7, 5))
    done = [t for t in trials if isinstance(t.get(x), (int, float)) and isinstance(t.get(y), (int, float))]
    ax.scatter([t[x] for t in done], [t[y] for t in done], c="lightgray", edgecolors="gray", label="trials")
    pts = sorted((t[x], t[y], t["trial"]) for t in front if t.get(x) is not None and t.get(y) is not None)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:red", label="Pareto front (feasible)")
        for px, py, n in pts:
            ax.annotate(f"#{n}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    labelled = set()
    for p in references:
        marked = p["split"] != split
        color = "tab:orange" if marked else "black" if p["setup"] == "uncompressed" else "tab:blue"
        style = {"marker": "*", "s": 150} if p["setup"] == "uncompressed" else {"marker": "s"}
        style.update({"facecolors": "none", "edgecolors": color} if marked else {"color": color})
        label = "uncompressed" if p["setup"] == "uncompressed" else "named setups"
        if marked:
            label += f", {p['split'].upper()} split (no {split} figure)"
        ax.scatter([p["x"]], [p["y"]], label=None if label in labelled else label, **style)
        labelled.add(label)
        if p["setup"] != "uncompressed":
            ax.annotate(p["setup"], (p["x"], p["y"]), textcoords="offset points", xytext=(4, -10), fontsize=8,
                        color=color)
    if line is not None and oy == quality:
        ax.axhline(line, linestyle="--", color="tab:green", label=f"{quality} constraint")
    if ox in ("macs", "params", "size_mb", "latency_ms"):
        ax.set_xscale("log")
    ax.set_xlabel(axis_label(ox, x, quality))
    ax.set_ylabel(axis_label(oy, y, quality))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def hypervolume(points: Sequence[Sequence[float]], directions: Sequence[str], reference: Sequence[float]) -> float:
    """Hypervolume of ``points`` (objective values) against ``reference``, every objective turned into a
    minimisation (optuna's implementation)."""
    signs = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    ref = np.asarray(reference, dtype=float) * signs
    pts = [np.asarray(p, dtype=float) * signs for p in points]
    pts = [p for p in pts if np.all(p < ref)]
    return float(compute_hypervolume(np.array(pts), ref)) if pts else 0.0
