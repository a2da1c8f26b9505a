"""Progress on the terminal: bars with totals and ETA for the run, a node's epochs and an epoch's batches;
plain lines when the output is not a terminal."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

from fedcore_adapter.progress import node_work
from fedcore_adapter.schema import Setup

ROOT = Path(__file__).resolve().parents[1]
RUN = ["tracking=none", "model=custom", "model._target_=tests.helpers.build_tiny_mlp", "data=custom",
       "data._target_=tests.helpers.build_tiny_data", "setup=raw", "nodes.0.epochs=3", "common.latency_repeats=2",
       "output_dir=out"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run_on_a_terminal(args: list[str], cwd: Path) -> str:
    """stderr on a pseudo-terminal, as in an interactive shell; returns everything written to it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
    proc = subprocess.Popen([sys.executable, "-m", "fedcore_adapter", *args], cwd=cwd, env=ENV,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.stdout.read()
    assert proc.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_the_run_epochs_and_batches_have_bars_with_totals_and_eta(tmp_path):
    screen = run_on_a_terminal(RUN, tmp_path)
    eta = r"\[\d\d:\d\d<\d\d:\d\d"  # tqdm's [elapsed<remaining
    assert re.search(r"RAW: +100%\S* 5/5 " + eta, screen), screen[-2000:]  # 1 input + 1 node + 3 epochs
    # the node's bars are cleared when they end, so the last state drawn depends on tqdm's refresh interval:
    # any drawn state shows the total and the ETA
    eta_slot = r"\[\d\d:\d\d<(\d\d:\d\d|\?)"  # before its first step a bar's remaining time is tqdm's '?'
    assert re.search(r"0:training epochs: +\d+%\|[^|]*\| \d/3 " + eta_slot, screen), screen[-2000:]
    # 96 samples / 16
    assert re.search(r"0:training epoch \d/3: +\d+%\|[^|]*\| \d/6 " + eta_slot, screen), screen[-2000:]


def test_off_a_terminal_there_are_no_bars_only_lines(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedcore_adapter", *RUN], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr and "it/s" not in proc.stderr and "epochs:" not in proc.stderr
    assert "node 0:training (1/1) ..." in proc.stdout + proc.stderr


def test_run_work_counts_every_epoch_of_a_node_once_per_pruning_iteration():
    setup = Setup.model_validate({"name": "W", "nodes": [
        {"kind": "training", "epochs": 4},
        {"kind": "pruning", "pruning_iterations": 3, "epochs": 1, "finetune_params": {"epochs": 2}},
        {"kind": "ptq_dynamic"}]})
    assert [node_work(n) for n in setup.nodes] == [1 + 4, 1 + (1 + 2) * 3, 1]
