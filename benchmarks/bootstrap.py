"""The metrics' two-way bootstrap, vectorised (``fidelity.metrics.score``) against the
replicate-by-replicate loop it replaced, on the selection shapes of the bundled suites, with
threads pinned, alternating rounds, medians and spreads, and the machine's load:

    python -m benchmarks.bootstrap [--rounds 5] [--replicates 1000] [--threads 1]

Both sides draw the same replicates for a seed; the largest difference of their interval
ends is printed beside the times (it must be round-off).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from fidelity.metrics import METRICS, score

#: (test points, removed points): nightly and ladder (10 x 60), lds (20 x 100), smoke (20 x 100)
SHAPES = ((10, 60), (20, 100), (20, 200))


def loop_score(predicted: np.ndarray, actual: np.ndarray, n_boot: int, seed: int) -> dict:
    """The bootstrap as it was: every replicate resampled and each metric computed on it."""
    rng = np.random.default_rng(seed)
    rows, cols = predicted.shape
    replicates = {name: np.empty(n_boot) for name in METRICS}
    with np.errstate(invalid="ignore", divide="ignore"):
        for b in range(n_boot):
            r = rng.integers(0, rows, rows)
            c = rng.integers(0, cols, cols)
            p, a = predicted[np.ix_(r, c)], actual[np.ix_(r, c)]
            for name, function in METRICS.items():
                replicates[name][b] = function(p, a)
    return {
        name: np.percentile(values[np.isfinite(values)], [2.5, 97.5])
        for name, values in replicates.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(
        f"load average before: {os.getloadavg()}, threads {args.threads}, {args.replicates} "
        "replicates, 5 metrics"
    )
    rng = np.random.default_rng(0)
    with threadpool_limits(args.threads):
        for rows, cols in SHAPES:
            actual = rng.standard_t(3, size=(rows, cols))
            predicted = actual + rng.normal(size=actual.shape)
            times: dict[str, list[float]] = {"loop": [], "vectorised": []}
            for _ in range(args.rounds):  # alternate, so drifting load hits both alike
                start = time.perf_counter()
                old = loop_score(predicted, actual, args.replicates, seed=0)
                times["loop"].append(time.perf_counter() - start)
                start = time.perf_counter()
                new = score(predicted, actual, n_boot=args.replicates, seed=0)
                times["vectorised"].append(time.perf_counter() - start)
            difference = max(
                abs(bound - end)
                for name, (low, high) in old.items()
                for bound, end in ((low, new[name].low), (high, new[name].high))
            )
            loop, vectorised = (np.array(times[k]) for k in ("loop", "vectorised"))
            print(
                f"{rows} x {cols}: loop median {np.median(loop):.3f} s "
                f"[{loop.min():.3f}, {loop.max():.3f}], vectorised median "
                f"{np.median(vectorised):.3f} s [{vectorised.min():.3f}, {vectorised.max():.3f}]"
                f", {np.median(loop) / np.median(vectorised):.1f}x; largest interval difference "
                f"{difference:.1e}"
            )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
