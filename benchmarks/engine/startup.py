"""Start-up time of `fedcore-adapter --help` (median of N runs), and the heavy modules it avoids importing.

    python -m benchmarks.engine.startup [--runs 7]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    exe = shutil.which("fedcore-adapter")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "fedcore_adapter", "--help"]
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    probe = ("import sys\nfrom fedcore_adapter.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'mlflow', 'dask', 'transformers') if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    print(f"{' '.join(cmd[-2:])}: median {statistics.median(times):.3f} s over {args.runs} runs "
          f"(min {min(times):.3f}, max {max(times):.3f}); heavy modules imported: {heavy}")


if __name__ == "__main__":
    main()
