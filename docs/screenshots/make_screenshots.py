"""Re-make the MLflow screenshots of the README: a three-setup quick sweep on MNIST-1D, logged to a real
``mlflow server`` on 127.0.0.1, photographed with headless Chromium.

    pip install playwright            # the driver only: the browser is the system's chromium
    apt-get install -y chromium       # Debian
    python -m docs.screenshots.make_screenshots [--out docs/screenshots] [--chromium /usr/bin/chromium]

Writes ``mlflow_runs_table.png`` (the experiment's runs table, opened on the headline view every
tracked run prints: one row per setup under the sweep run, the headline metrics as columns),
``mlflow_compare.png`` (MLflow's compare view of the three setup runs) and, beside each, the
page's text (``.txt``) so that a test can check what the pictures show. Takes a few minutes on 2 CPUs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.servers import mlflow_server  # the tests' MLflow server: the same start, readiness check and stop

ROOT = Path(__file__).resolve().parents[2]
SETUPS = {  # short versions of the named setups' shapes: a few epochs each
    "raw.yaml": {"name": "RAW", "description": "training only (the baseline)",
                 "nodes": [{"kind": "training", "epochs": 3}]},
    "pruning.yaml": {"name": "PRUNING", "description": "training, then half the channels removed and a fine-tune",
                     "nodes": [{"kind": "training", "epochs": 3},
                               {"kind": "pruning", "pruning_ratio": 0.5, "pruning_iterations": 1, "epochs": 1}]},
    "low_rank_ptq.yaml": {"name": "LOW_RANK_PTQ", "description": "training, low-rank, dynamic int8 quantization",
                          "nodes": [{"kind": "training", "epochs": 3},
                                    {"kind": "low_rank", "epochs": 1, "thresholds": [0.9],
                                     "finetune_params": {"epochs": 1}},
                                    {"kind": "ptq_dynamic"}]},
}
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def run_sweep(home: Path, uri: str, quick: bool = False) -> None:
    """``fedcore-adapter -m setup=raw.yaml,pruning.yaml,low_rank_ptq.yaml`` on MNIST-1D (``quick``: scikit-learn's
    digits, one epoch per training), logged to ``uri``."""
    import yaml

    for name, setup in SETUPS.items():
        if quick:
            setup = {**setup, "nodes": [{**n, "epochs": 1} if n["kind"] == "training" else n for n in setup["nodes"]]}
        (home / name).write_text(yaml.safe_dump(setup, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("FEDCORE_PARENT_RUN_ID", None)
    args = ["-m", f"setup={','.join(SETUPS)}", f"tracking.uri={uri}", "output_dir=out",
            *(["model=digits_cnn", "data=digits"] if quick else [])]
    proc = subprocess.run([sys.executable, "-m", "fedcore_adapter", *args], cwd=home, env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the sweep failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def sweep_runs(uri: str) -> tuple[str, str, list[str]]:
    """The experiment id, the sweep run's id and the setup runs' ids (oldest first)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([experiment.experiment_id], "tags.`fedcore.role` = 'setup'", order_by=["start_time ASC"])
    [sweep] = client.search_runs([experiment.experiment_id], "tags.`fedcore.role` = 'sweep'")
    return experiment.experiment_id, sweep.info.run_id, [r.info.run_id for r in runs]


def photograph(uri: str, experiment_id: str, sweep_id: str, run_ids: list[str], out: Path, chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    from fedcore_adapter.tracking.store import headline_url

    written = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(profile, executable_path=chromium, args=CHROMIUM_FLAGS,
                                                       headless=True, viewport={"width": 2000, "height": 640})
        page = browser.new_page()
        page.goto(headline_url(uri, experiment_id))
        page.get_by_text("accuracy_delta_pt").first.wait_for(timeout=60_000)
        _close_side_panels(page)
        page.locator(f'[role="row"][row-id="{sweep_id}"] button').first.click()  # unfold the sweep: its setup runs
        page.get_by_text("PRUNING").first.wait_for(timeout=30_000)
        page.wait_for_timeout(1500)
        written += _shot(page, out / "mlflow_runs_table.png")

        page.set_viewport_size({"width": 1400, "height": 1000})
        page.goto(f"{uri}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([experiment_id])}"
                  "&workflowType=machine_learning")
        page.get_by_text("accuracy_delta_pt").first.wait_for(timeout=60_000)
        _close_side_panels(page)
        for section in ("Visualizations", "Parameters", "Artifacts", "Tags"):  # folded: the runs and their metrics
            with contextlib.suppress(Exception):
                page.get_by_text(section, exact=True).first.click(timeout=5000)
        with contextlib.suppress(Exception):  # only the metrics that differ between the setups
            page.get_by_text("Metrics", exact=True).first.locator("xpath=following::*[@role='switch'][1]").click(
                timeout=5000)
        page.get_by_text("Comparing 3 Runs").first.scroll_into_view_if_needed()
        page.wait_for_timeout(1500)
        written += _shot(page, out / "mlflow_compare.png")
        browser.close()
    return written


def _close_side_panels(page) -> None:
    """MLflow 3 opens its assistant panel beside the page; close it (and any first-visit tip)."""
    for name in ("Close", "Got it", "Hide banner"):
        with contextlib.suppress(Exception):
            button = page.get_by_role("button", name=name)
            if button.count():
                button.first.click(timeout=2000)


def _shot(page, path: Path, full_page: bool = False) -> list[Path]:
    page.screenshot(path=str(path), full_page=full_page)
    text = path.with_suffix(".txt")
    text.write_text(page.inner_text("body"))
    return [path, text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for the PNGs")
    parser.add_argument("--quick", action="store_true", help="digits instead of MNIST-1D, one training epoch (tests)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the Chromium binary (default: chromium on PATH)")
    args = parser.parse_args(argv)
    if not args.chromium:
        print("error: no chromium on PATH (apt-get install -y chromium, or --chromium PATH)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedcore_screenshots_") as tmp:
        home = Path(tmp)
        with mlflow_server(home) as uri:
            run_sweep(home, uri, args.quick)
            experiment_id, sweep_id, run_ids = sweep_runs(uri)
            written = photograph(uri, experiment_id, sweep_id, run_ids, out, args.chromium)
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
