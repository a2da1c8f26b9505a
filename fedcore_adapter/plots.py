"""Plots of measured runs: one run across its nodes, and runs compared (quality against size and latency).

Used by the comparison report (``report``) and by tracking (a run's node plot as an MLflow artifact).
"""
from __future__ import annotations

from pathlib import Path

NODE_PLOTS = [("params", "parameters"), ("size_mb", "size (MB)"), ("latency_ms", "latency (ms / batch)"),
              ("accuracy", "accuracy")]
RAW_SETUP = "RAW"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    # lazy: matplotlib takes most of a second to import; it is imported on the first plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    return plt


def plot_nodes(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """One run across its nodes: parameters, size, latency and accuracy per node (row 0 = input)."""
    plt = pyplot()
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
    pyplot().close(fig)
    return path


def comparison_figure(rows: list[dict], metric: str = "accuracy"):
    from matplotlib.ticker import MaxNLocator  # lazy: as in pyplot

    plt = pyplot()
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
