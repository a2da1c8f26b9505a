"""The comparison report across runs: a CSV, a Markdown table and accuracy-vs-size / -latency plots.

Runs come from results folders (``metrics.json`` + ``run.json``) or from a tracking
store (``tracking.fetch_runs``); both give the same summaries ``{source, run_name,
setup, status, rows}`` with row 0 the input model. The input model (and a ``RAW``
run, when there is one) is marked as the baseline.

    fedcore-adapter compare composition_results --out composition_results/comparison
    fedcore-adapter compare --tracking-uri sqlite:///mlflow.db --experiment mnist1d_cnn --out cmp
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .errors import ConfigError

CSV_COLUMNS = ["run", "setup", "status", "baseline", "chain", "params", "macs", "size_mb", "latency_ms",
               "throughput_sps", "accuracy", "loss", "params_ratio", "size_mb_ratio", "speedup", "accuracy_delta",
               "source"]
MD_COLUMNS = ["run", "setup", "baseline", "chain", "params", "size_mb", "latency_ms", "accuracy", "size_mb_ratio",
              "speedup", "accuracy_delta"]
NODE_PLOTS = [("params", "parameters"), ("size_mb", "size (MB)"), ("latency_ms", "latency (ms / batch)"),
              ("accuracy", "accuracy")]
RAW_SETUP = "RAW"


# -- reading runs --------------------------------------------------------------------------------------
def _folder_summary(folder: Path) -> dict:
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").exists() else {}
    return {"source": str(folder), "run_name": run.get("run_name") or folder.name, "setup": run.get("setup", ""),
            "status": run.get("status", "unknown"), "rows": json.loads((folder / "metrics.json").read_text())}


def runs_from_folders(paths: Iterable[str | Path], include_partial: bool = False, depth: int = 3) -> list[dict]:
    """Summaries of the results folders under ``paths`` (a results folder, or a folder holding some)."""
    from .results import PARTIAL_SUFFIX

    found: list[dict] = []

    def visit(folder: Path, level: int) -> None:
        if (folder / "metrics.json").is_file():
            if include_partial or not folder.name.endswith(PARTIAL_SUFFIX):
                found.append(_folder_summary(folder))
            return
        if level < depth:
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                visit(child, level + 1)

    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"compare: {path!r} is not a folder (give results folders, e.g. composition_results)")
        visit(folder, 0)
    return found


# -- the table -------------------------------------------------------------------------------------------
def _ratio(a: Any, b: Any) -> Optional[float]:
    ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
    return float(a) / float(b) if ok else None


def _final_row(run: dict, final: dict, base: dict, baseline: str = "") -> dict:
    row = {"run": run["run_name"], "setup": run["setup"], "status": run["status"], "baseline": baseline,
           "chain": " -> ".join(str(r.get("kind")) for r in run["rows"][1:]), "source": run["source"],
           **{k: final.get(k) for k in ("params", "macs", "size_mb", "latency_ms", "throughput_sps", "accuracy", "loss")}}
    row["params_ratio"] = _ratio(final.get("params"), base.get("params"))
    row["size_mb_ratio"] = _ratio(final.get("size_mb"), base.get("size_mb"))
    row["speedup"] = _ratio(base.get("latency_ms"), final.get("latency_ms"))
    acc, base_acc = final.get("accuracy"), base.get("accuracy")
    row["accuracy_delta"] = acc - base_acc if isinstance(acc, float) and isinstance(base_acc, float) else None
    return row


def comparison_rows(runs: Sequence[dict]) -> list[dict]:
    """One row per distinct input model (``baseline = input``), then one per run (its final model)."""
    table, seen = [], set()
    for run in runs:
        base = run["rows"][0]
        signature = tuple(round(v, 6) if isinstance(v, float) else v
                          for v in (base.get("params"), base.get("size_mb"), base.get("accuracy")))
        if signature not in seen:
            seen.add(signature)
            table.append(_final_row({**run, "setup": "input", "status": "", "rows": run["rows"][:1]}, base, base,
                                    "input"))
    for run in runs:
        if len(run["rows"]) > 1:
            base = run["rows"][0]
            table.append(_final_row(run, run["rows"][-1], base, RAW_SETUP if run["setup"].upper() == RAW_SETUP else ""))
    return table


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# -- plots -----------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_nodes(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """One run across its nodes: parameters, size, latency and accuracy per node (row 0 = input)."""
    plt = _pyplot()
    labels = [f"{r.get('node_index', i)}:{r.get('node', '')}" for i, r in enumerate(rows)]
    fig, axes = plt.subplots(1, len(NODE_PLOTS), figsize=(4 * len(NODE_PLOTS), 3.6))
    for ax, (key, name) in zip(axes, NODE_PLOTS):
        values = [r.get(key) if isinstance(r.get(key), (int, float)) else float("nan") for r in rows]
        ax.bar(range(len(rows)), values, color=["#888888"] + ["#1f77b4"] * (len(rows) - 1))
        ax.set_title(name if any(v == v for v in values) else f"{name}: not measured")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle(title or "metrics by node (grey: input model)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comparison(rows: list[dict], path: str | Path, metric: str = "accuracy") -> Path:
    """``metric`` against size and against latency; the input model(s) as black stars, RAW as a dashed line."""
    fig = comparison_figure(rows, metric)
    path = Path(path)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def comparison_figure(rows: list[dict], metric: str = "accuracy"):
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, x_key, x_name in ((axes[0], "size_mb", "size (MB)"), (axes[1], "latency_ms", "latency (ms / batch)")):
        points = [r for r in rows if isinstance(r.get(x_key), (int, float)) and isinstance(r.get(metric), (int, float))]
        for r in points:
            xy = (r[x_key], r[metric])
            if r["baseline"] == "input":
                ax.scatter(*xy, marker="*", s=260, facecolors="none", edgecolors="black", linewidths=1.5, zorder=4)
                ax.annotate("input (baseline)", xy, textcoords="offset points", xytext=(6, -12), fontsize=8)
                continue
            raw = r["baseline"] == RAW_SETUP
            ax.scatter(*xy, marker="D" if raw else "o", s=50, color="tab:red" if raw else None, zorder=3)
            ax.annotate(r["setup"], xy, textcoords="offset points", xytext=(5, 5), fontsize=8)
            if raw:
                ax.axhline(r[metric], color="tab:red", linestyle="--", linewidth=1, label=f"RAW {metric}")
        if any(r["baseline"] == RAW_SETUP for r in points):
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(x_name)
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.grid(alpha=0.3)
        if not points:
            ax.set_title(f"no run measured both {metric} and {x_key}")
    fig.tight_layout()
    return fig


# -- the report ------------------------------------------------------------------------------------------
def write_report(runs: Sequence[dict], out_dir: str | Path, metric: str = "accuracy") -> dict[str, Path]:
    """Write ``comparison.csv``, ``comparison.md`` and ``comparison.png`` to ``out_dir``; returns their paths."""
    from .results import markdown_table, write_text

    if not runs:
        raise ConfigError("compare: no runs found (completed results folders, or setup runs in the tracking store)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(runs)
    paths = {"csv": out / "comparison.csv", "markdown": out / "comparison.md", "plot": out / "comparison.png"}
    write_text(paths["csv"], to_csv(rows))
    md = ("Final model of each run against its input model (baseline). `size_mb_ratio`: final / input size; "
          "`speedup`: input / final latency; `accuracy_delta`: final - input accuracy.\n\n" + markdown_table(rows, MD_COLUMNS))
    write_text(paths["markdown"], md)
    plot_comparison(rows, paths["plot"], metric)
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    """``fedcore-adapter compare``: the comparison report from results folders or a tracking store."""
    parser = argparse.ArgumentParser(prog="fedcore-adapter compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", help="results folders, or folders holding them (e.g. composition_results)")
    parser.add_argument("--tracking-uri", help="read the runs from this MLflow store (default with --experiment: "
                                               "sqlite:///mlflow.db in the working directory)")
    parser.add_argument("--experiment", help="MLflow experiment to read (default: every experiment of the store)")
    parser.add_argument("--out", default="composition_results/comparison", help="folder for the CSV, Markdown and PNG")
    parser.add_argument("--metric", default="accuracy", help="quality metric on the plots' y axis")
    parser.add_argument("--include-partial", action="store_true", help="also unfinished (.partial) results folders")
    args = parser.parse_args(argv)
    if not args.folders and not args.tracking_uri and not args.experiment:
        raise ConfigError("compare: give results folders (e.g. composition_results) or --tracking-uri URI "
                          "[--experiment NAME]")
    runs = runs_from_folders(args.folders, args.include_partial) if args.folders else []
    if args.tracking_uri or args.experiment:
        from .tracking import fetch_runs

        runs += [r for r in fetch_runs(args.tracking_uri, args.experiment) if args.include_partial or r["status"] == "completed"]
    paths = write_report(runs, args.out, args.metric)
    print(paths["markdown"].read_text(), end="")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
