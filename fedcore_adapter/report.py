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

import yaml

from .errors import ConfigError
from .plots import RAW_SETUP, plot_comparison
from .results import DIFFERENCE_COLUMNS, PARTIAL_SUFFIX, markdown_table, write_text

CSV_COLUMNS = ["run", "setup", "status", "baseline", "chain", "runtime", "threads", "batch_shape", "params", "macs",
               "size_mb", "latency_ms", "throughput_sps", "accuracy", "loss", "params_ratio", "size_mb_ratio",
               "speedup", "accuracy_delta_pt", "loss_delta", "source"]
MD_COLUMNS = ["run", "setup", "baseline", "chain", "runtime", "params", "size_mb", "latency_ms", "accuracy",
              "size_mb_ratio", "speedup", "accuracy_delta_pt"]


# -- reading runs --------------------------------------------------------------------------------------
def _folder_summary(folder: Path) -> dict:
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").exists() else {}
    return {"source": str(folder), "run_name": run.get("run_name") or folder.name, "setup": run.get("setup", ""),
            "status": run.get("status", "unknown"), "rows": json.loads((folder / "metrics.json").read_text())}


def runs_from_folders(paths: Iterable[str | Path], include_partial: bool = False, depth: int = 4) -> list[dict]:
    """Summaries of the results folders under ``paths`` (a results folder, or a folder holding some): ``depth``
    reaches a sweep's runs from the output folder (``composition_results/sweeps/<time>/<job>/<name>``)."""
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
    return _distinct_names(found)


def _seed(folder: Path) -> Any:
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        setup = config.get("setup_resolved") or config.get("setup")  # the CLI's config / the Python API's
        return ((setup if isinstance(setup, dict) else {}).get("common") or {}).get("seed")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _distinct_names(runs: list[dict]) -> list[dict]:
    """Runs sharing a name (a sweep's seeds, reruns) are told apart: ``RAW seed=1`` when their seeds differ,
    else ``RAW (<folder>)``."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["run_name"], []).append(run)
    for name, same in groups.items():
        if len(same) < 2:
            continue
        seeds = [_seed(Path(run["source"])) for run in same]
        distinct = None not in seeds and len(set(seeds)) == len(seeds)
        for run, seed in zip(same, seeds):
            source = Path(run["source"])
            run["run_name"] = f"{name} seed={seed}" if distinct else f"{name} ({source.parent.name}/{source.name})"
    return runs


# -- the table -------------------------------------------------------------------------------------------
def _ratio(a: Any, b: Any) -> Optional[float]:
    ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
    return float(a) / float(b) if ok else None


def _final_row(run: dict, final: dict, base: dict, baseline: str = "") -> dict:
    row = {"run": run["run_name"], "setup": run["setup"], "status": run["status"], "baseline": baseline,
           "chain": " -> ".join(str(r.get("kind")) for r in run["rows"][1:]), "source": run["source"],
           **{k: final.get(k) for k in ("runtime", "threads", "batch_shape", "params", "macs", "size_mb", "latency_ms",
                                        "throughput_sps", "accuracy", "loss")}}
    row["params_ratio"] = _ratio(final.get("params"), base.get("params"))
    row["size_mb_ratio"] = _ratio(final.get("size_mb"), base.get("size_mb"))
    row["speedup"] = _ratio(base.get("latency_ms"), final.get("latency_ms"))
    for key, (suffix, scale) in DIFFERENCE_COLUMNS.items():  # the names and units of the MLflow headline
        value, before = final.get(key), base.get(key)
        ok = isinstance(value, float) and isinstance(before, float)
        row[f"{key}_delta{suffix}"] = (value - before) * scale if ok else None
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


# -- the report ------------------------------------------------------------------------------------------
def write_report(runs: Sequence[dict], out_dir: str | Path, metric: str = "accuracy") -> dict[str, Path]:
    """Write ``comparison.csv``, ``comparison.md`` and ``comparison.png`` to ``out_dir``; returns their paths."""
    if not runs:
        raise ConfigError("compare: no runs found (completed results folders, or setup runs in the tracking store)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(runs)
    paths = {"csv": out / "comparison.csv", "markdown": out / "comparison.md", "plot": out / "comparison.png"}
    write_text(paths["csv"], to_csv(rows))
    md = ("Final model of each run against its input model (baseline). `size_mb_ratio`: final / input size; "
          "`speedup`: input / final latency; `accuracy_delta_pt`: final - input accuracy, in percentage points.\n\n"
          + markdown_table(rows, MD_COLUMNS))
    write_text(paths["markdown"], md)
    plot_comparison(rows, paths["plot"], metric)
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    """``fedcore-adapter compare``: the comparison report from results folders or a tracking store."""
    parser = argparse.ArgumentParser(prog="fedcore-adapter compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*",
                        help="results folders, or folders holding them (e.g. composition_results)")
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
        from .tracking import fetch_runs  # lazy: pydantic (and mlflow when called), only to read from a server

        runs += [r for r in fetch_runs(args.tracking_uri, args.experiment)
                 if args.include_partial or r["status"] == "completed"]
    paths = write_report(runs, args.out, args.metric)
    print(paths["markdown"].read_text(), end="")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
