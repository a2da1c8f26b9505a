"""docs/screenshots/make_screenshots.py: a three-setup sweep logged to a real ``mlflow server``, photographed
with headless Chromium (runs when chromium and the playwright driver are installed)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="the playwright driver is not installed (pip install -e '.[screenshots]')"),
]
HEADLINE = ("accuracy", "accuracy_delta_pt", "compression_ratio", "speedup", "latency_ms", "params_ratio")
SETUPS = ("RAW", "PRUNING", "LOW_RANK_PTQ")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    out = tmp_path_factory.mktemp("screenshots")
    proc = subprocess.run([sys.executable, "-m", "docs.screenshots.make_screenshots", "--quick",
                           "--out", str(out), "--chromium", CHROMIUM], cwd=out, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_runs_table_shows_every_setup_with_its_headline_metrics_as_columns(shots):
    assert png_size(shots / "mlflow_runs_table.png")[0] >= 1200
    page = (shots / "mlflow_runs_table.txt").read_text()
    assert all(column in page for column in HEADLINE), page[:3000]
    assert all(f"{setup} \N{MIDDLE DOT} digits_cnn \N{MIDDLE DOT} seed=42" in page for setup in SETUPS), page[:3000]
    assert "sweep " in page and "Overview" not in page  # the model-training side, not the GenAI overview


def test_the_compare_view_shows_the_three_setups_side_by_side(shots):
    assert png_size(shots / "mlflow_compare.png")[1] >= 600
    page = (shots / "mlflow_compare.txt").read_text()
    first_rows = ("accuracy", "accuracy_delta_pt", "compression_ratio", "latency_ms")  # MLflow renders the rows in view
    assert all(column in page for column in first_rows), page[:3000]
    assert all(setup in page for setup in SETUPS), page[:3000]
