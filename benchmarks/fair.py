"""Fair timing of contenders (ours against a peer library, or settings against each other).

Every contender runs pinned to the same thread count on both sides (``torch.set_num_threads``
for torch, ``threadpoolctl`` for the BLAS and OpenMP pools of numpy, scipy and scikit-learn),
at each of ``THREADS`` in turn so that each side can be compared at its best setting, in
alternating rounds (the order of the contenders is reversed every other round, so that drift in
the machine's load hits all alike). Reports print medians with the range of the rounds, the
machine's load before and after, and the configuration. A peer that collapses under thread
contention is then seen at the thread count where it does not, instead of measuring the
contention.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

THREADS = (1, 2)  # thread counts every contender is timed at (the machine has 2 cores)


@contextmanager
def pinned(threads: int) -> Iterator[None]:
    """torch and every BLAS/OpenMP pool limited to ``threads`` for the block."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(previous)


def machine() -> str:
    """Cores and the load average now, for the lines printed with every figure."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{os.cpu_count()} cores, load average {load}"


@dataclass
class Timings:
    """Seconds per (contender, threads) over the rounds, and each contender's last output."""

    seconds: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)

    def median(self, name: str, threads: int) -> float:
        return float(np.median(self.seconds[(name, threads)]))

    def best(self, name: str) -> tuple[int, float]:
        """(threads, median seconds) of ``name`` at its fastest thread count."""
        return min(
            ((t, self.median(n, t)) for n, t in self.seconds if n == name), key=lambda x: x[1]
        )

    def print(self, indent: str = "  ") -> None:
        width = max(len(name) for name, _ in self.seconds) + 12
        for (name, threads), values in self.seconds.items():
            spread = np.array(values)
            label = f"{name}, {threads} thread{'s' if threads > 1 else ''}"
            print(
                f"{indent}{label:<{width}} median {np.median(spread):8.3f} s "
                f"[{spread.min():.3f}, {spread.max():.3f}]"
            )


def alternate(
    contenders: dict[str, Callable[[], Any]],
    rounds: int,
    threads: tuple[int, ...] = THREADS,
    timings: Timings | None = None,
) -> Timings:
    """Time every contender at every thread count in ``rounds`` alternating rounds."""
    timings = timings or Timings()
    names = list(contenders)
    for round_ in range(rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for count in threads:
            for name in order:
                with pinned(count):
                    start = time.perf_counter()
                    output = contenders[name]()
                    seconds = time.perf_counter() - start
                timings.seconds.setdefault((name, count), []).append(seconds)
                timings.outputs[name] = output
    return timings


def agreement(scores: Any, reference: Any) -> tuple[float, float]:
    """(Pearson r, relative error ||s - ref|| / ||ref||) of flattened scores."""
    values = np.asarray(torch.as_tensor(scores).flatten(), dtype=np.float64)
    expected = np.asarray(torch.as_tensor(reference).flatten(), dtype=np.float64)
    r = float(np.corrcoef(values, expected)[0, 1])
    return r, float(np.linalg.norm(values - expected) / np.linalg.norm(expected))
