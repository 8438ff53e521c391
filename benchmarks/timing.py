"""Shared timing for the benchmarks: best round per way, with the ways interleaved so that drifting machine load
hits every way alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def interleaved_rates(ways: Mapping[str, Callable[[], None]], items: int, rounds: int) -> dict[str, float]:
    """Items per second of each way's fastest round."""
    rates = {name: 0.0 for name in ways}
    for _ in range(rounds):
        for name, run in ways.items():
            started = time.perf_counter()
            run()
            rates[name] = max(rates[name], items / (time.perf_counter() - started))
    return rates
