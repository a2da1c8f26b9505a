"""What a search leaves behind: ``trials.csv``, ``pareto.csv``, ``pareto.png`` and each Pareto trial's setup
as a YAML file that ``setup=<file>`` runs again (with the search's ``pretrained=``)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import yaml
from optuna._hypervolume import compute_hypervolume

from ..plots import pyplot
from ..results import write_text

# val_accuracy: on the validation split, what the search selects on (constraint, objective, front);
# accuracy: on the test split, the held-out figure (as in every run's metrics rows)
SUMMARY = ["trial", "state", "chain", "start_node", "val_accuracy", "val_accuracy_drop_pt", "accuracy",
           "accuracy_drop_pt", "macs", "macs_reduction", "params", "params_reduction", "size_mb", "latency_ms",
           "latency_ratio", "throughput_sps", "feasible", "wall_s", "epochs", "worker", "output_dir", "error"]


def _reduction(reference: Optional[float], value: Optional[float]) -> Optional[float]:
    return reference / value if isinstance(reference, (int, float)) and isinstance(value, (int, float)) and value \
        else None


def _drop_pt(reference: Optional[float], value: Optional[float]) -> Optional[float]:
    return (reference - value) * 100 if isinstance(reference, (int, float)) and isinstance(value, (int, float)) \
        else None


def trial_row(number: int, state: str, attrs: dict, params: dict, reference: dict) -> dict:
    """One line of trials.csv: the trial's validation accuracy, its last measured row (test split), the drops and
    reductions against the reference, its params."""
    last = attrs.get("metrics") or {}
    ref = reference.get("row") or {}
    acc, ref_acc = last.get("accuracy"), ref.get("accuracy")
    val, ref_val = attrs.get("val_accuracy"), reference.get("val_accuracy")
    row = {"trial": number, "state": state, "chain": attrs.get("chain"), "start_node": attrs.get("start_node"),
           "val_accuracy": val, "val_accuracy_drop_pt": _drop_pt(ref_val, val),
           **{k: last.get(k) for k in ("accuracy", "macs", "params", "size_mb", "latency_ms", "throughput_sps")},
           "accuracy_drop_pt": _drop_pt(ref_acc, acc),
           "macs_reduction": _reduction(ref.get("macs"), last.get("macs")),
           "params_reduction": _reduction(ref.get("params"), last.get("params")),
           "latency_ratio": _reduction(ref.get("latency_ms"), last.get("latency_ms")),
           "feasible": attrs.get("feasible"), "wall_s": attrs.get("wall_s"), "epochs": attrs.get("epochs"),
           "worker": attrs.get("worker"), "output_dir": attrs.get("output_dir"),
           "error": attrs.get("error") or attrs.get("reason")}
    row.update({f"param:{k}": v for k, v in sorted(params.items())})
    return row


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    columns = list(SUMMARY)
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


def reference_points(folders: Iterable[Path], objectives: Sequence[str]) -> list[tuple[str, list[float]]]:
    """``(name, [objective values])`` of the final row of each completed results folder given."""
    out = []
    for folder in folders:
        try:
            rows = json.loads((Path(folder) / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        values = [rows[-1].get(o) for o in objectives] if rows else []
        if values and all(isinstance(v, (int, float)) for v in values):
            out.append((Path(folder).name, values))
    return out


def plot_front(path: Path, trials: Sequence[dict], front: Sequence[dict], objectives: Sequence[str],
               references: Sequence[tuple[str, list[float]]], reference_row: dict, line: Optional[float],
               columns: Optional[dict] = None) -> bool:
    """``pareto.png``: every finished trial on the first two objectives (each read from ``columns.get(objective,
    objective)`` of the rows: the figure the search selects on), the front, the named setups' points."""
    if len(objectives) < 2:
        return False
    columns = columns or {}
    plt = pyplot()
    (ox, oy), (x, y) = objectives[:2], [columns.get(o, o) for o in objectives[:2]]
    fig, ax = plt.subplots(figsize=(7, 5))
    done = [t for t in trials if isinstance(t.get(x), (int, float)) and isinstance(t.get(y), (int, float))]
    ax.scatter([t[x] for t in done], [t[y] for t in done], c="lightgray", edgecolors="gray", label="trials")
    pts = sorted((t[x], t[y], t["trial"]) for t in front if t.get(x) is not None and t.get(y) is not None)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:red", label="Pareto front (feasible)")
        for px, py, n in pts:
            ax.annotate(f"#{n}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, (rx, ry, *_) in references:
        ax.scatter([rx], [ry], marker="s", color="tab:blue")
        ax.annotate(name, (rx, ry), textcoords="offset points", xytext=(4, -10), fontsize=8, color="tab:blue")
    # the named setups' points are their runs' metrics rows (test split)
    if isinstance(reference_row.get(x), (int, float)) and isinstance(reference_row.get(y), (int, float)):
        ax.scatter([reference_row[x]], [reference_row[y]], marker="*", s=150, color="black", label="uncompressed")
    if line is not None and oy == "accuracy":
        ax.axhline(line, linestyle="--", color="tab:green", label="accuracy constraint")
    if ox in ("macs", "params", "size_mb", "latency_ms"):
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
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
