"""The results folder: layout, atomic writes, the metrics table and its summary.

``<root>/<SETUP>[_<model_name>]/`` holds ``config.yaml``, ``run.json``,
``metrics.json``, ``metrics.csv``, ``nodes/<i>_<kind>/`` checkpoints and
``final/``. While a run is under way (or after it failed) the folder is
``<name>.partial``; it is renamed when the run completes, so a folder without
that suffix is always complete. Which name a run gets, and who owns a folder, is
``placement``'s job.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

METRIC_COLUMNS = [
    "node_index", "node", "kind", "params", "macs", "size_mb", "latency_ms", "latency_ms_per_sample",
    "throughput_sps", "accuracy", "loss", "sparsity", "batch_size", "device", "dtype", "wall_s",
]
RATIO_COLUMNS = ["params", "macs", "size_mb", "latency_ms", "throughput_sps"]  # a ratio to the input means something
DIFFERENCE_COLUMNS = {"accuracy": ("_pt", 100.0), "loss": ("", 1.0)}  # quality: (suffix, scale) of final - input
PARTIAL_SUFFIX = ".partial"
MINUS = "\N{MINUS SIGN}"


def run_folder_name(setup_name: str, model_name: Optional[str] = None) -> str:
    return f"{setup_name}_{model_name}" if model_name else setup_name


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    write_text(path, json.dumps(data, indent=2, default=str))


def columns_of(rows: Iterable[dict]) -> list[str]:
    rows = list(rows)
    extra = sorted({k for r in rows for k in r} - set(METRIC_COLUMNS))
    return [c for c in METRIC_COLUMNS if any(c in r for r in rows)] + extra


def write_metrics(folder: Path, rows: list[dict]) -> None:
    write_json(folder / "metrics.json", rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns_of(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(folder / "metrics.csv", buffer.getvalue())


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _change(column: str, value: Any, base: Any) -> str:
    """`` (0.25x)`` for a ratio column, `` (-0.2 pt)`` / `` (+0.013)`` for a quality one, else nothing."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, base))
    if not numbers:
        return ""
    if column in RATIO_COLUMNS:
        return f" ({value / base:.2f}x)" if base else ""
    if column in DIFFERENCE_COLUMNS:
        suffix, scale = DIFFERENCE_COLUMNS[column]
        unit = " pt" if suffix == "_pt" else ""
        delta = (value - base) * scale
        text = (f"{delta:+.1f}" if unit else f"{delta:+.3g}").replace("-", MINUS)
        return f" ({text}{unit})"
    return ""


def summary_table(rows: list[dict], columns: Optional[list[str]] = None) -> str:
    """Plain-text table: each metric per node and, in brackets, its change from row 0 (the input model):
    a ratio for sizes and speeds (``0.25x``), a difference for quality (``accuracy`` in points, ``loss``)."""
    if not rows:
        return "(no rows)"
    base = rows[0]
    columns = columns or [c for c in ["node", "params", "macs", "size_mb", "latency_ms", "throughput_sps",
                                      "accuracy", "loss", "dtype", "wall_s"] if any(c in r for r in rows)]
    table = [columns]
    for row in rows:
        table.append([_fmt(row.get(c)) + ("" if row is base else _change(c, row.get(c), base.get(c))) for c in columns])
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"
