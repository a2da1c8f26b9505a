"""Side-by-side latency for the quantization benchmarks: variants interleaved round by round.

On a shared CPU the load changes from one second to the next, so every round
times every variant back to back, and speed-ups are the median over rounds of
the per-round ratio ``baseline / variant`` (each variant's time in a round is
the median of ``per_round`` calls, after warm-up).

``settle``: seconds of pause before each variant's calls in a round, then one untimed call. Runtimes
keep their idle worker threads spinning for a while after a call (ONNX Runtime's intra-op pool
does by default); on a 2-core machine the spinning threads of the variant timed just before steal
the cores from the next one, which then measures up to 10x slower at batch 1 (an ONNX Runtime
session called right after another measured 14-20 ms against 2.3-2.9 ms on its own).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def time_call(fn: Callable[[], Any], n: int) -> float:
    """Median wall time of ``n`` calls, in ms."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def interleaved_latency(calls: dict[str, Callable[[], Any]], baseline: str, rounds: int = 7, per_round: int = 3,
                        warmup: int = 2, settle: float = 0.0) -> dict[str, dict[str, Any]]:
    """``{name: {latency_ms, speedup, speedup_min, speedup_max, times}}`` over interleaved rounds
    (``times``: the variant's time in each round, ms)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in calls.items():
                if settle:
                    time.sleep(settle)
                    fn()
                times[name].append(time_call(fn, per_round))
    out = {}
    for name, values in times.items():
        ratios = [b / t for b, t in zip(times[baseline], values)]
        out[name] = {"latency_ms": statistics.median(values), "speedup": statistics.median(ratios),
                     "speedup_min": min(ratios), "speedup_max": max(ratios), "times": values}
    return out
