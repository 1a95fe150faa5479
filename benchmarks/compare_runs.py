"""Compare two run directories number by number: every array of arrays/*.npz and every metric
of results.json (any schema version), printing the largest absolute difference of each.

    python -m benchmarks.compare_runs RUN_A RUN_B

Used to check that a change of structure changed no number: before and after a redesign, run
the same suites from empty caches and compare. Exit status 1 when any array or metric differs
beyond ``--atol`` (default 0: bitwise).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

GAP_MEASURES = ("output_rms", "relative_mae", "one_minus_pearson")
CEILING_MEASURES = ("pearson", "spearman", "max_correlation")


def metric_values(results: dict) -> dict[tuple[str, ...], float | None]:
    """Every number results.json holds about agreement, for both schema versions: each metric
    (value, low, high), each gap of the decomposition and each noise ceiling."""
    found = {}
    for problem, entry in results["problems"].items():
        for estimator, by_response in entry["metrics"].items():
            for response, metrics in by_response.items():
                for metric, interval in metrics.items():
                    for part in ("value", "low", "high"):
                        found[problem, estimator, response, metric, part] = interval.get(part)
        decomposition = entry.get("decomposition") or {"gaps": [], "estimators": {}}
        gaps = [*decomposition["gaps"], *decomposition["estimators"].values()]
        for gap in gaps:
            for measure in GAP_MEASURES:
                found[problem, "gap", gap["from"], gap["to"], measure] = gap[measure]
        for response, info in entry["responses"].items():
            for measure in CEILING_MEASURES:
                ceiling = info.get("noise_ceiling") or {}
                found[problem, "noise ceiling", response, measure] = ceiling.get(measure)
    return found


def largest_difference(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.dtype.kind in "US" or b.dtype.kind in "US":
        return 0.0 if np.array_equal(a, b) else float("inf")
    return float(np.max(np.abs(a.astype(float) - b.astype(float)), initial=0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--atol", type=float, default=0.0)
    args = parser.parse_args()
    failures = 0
    for path in sorted((args.first / "arrays").glob("*.npz")):
        other = args.second / "arrays" / path.name
        with np.load(path) as a, np.load(other) as b:
            missing = sorted(set(a.files) ^ set(b.files))
            if missing:
                print(f"{path.name}: arrays in one run only: {missing}")
                failures += 1
            for name in sorted(set(a.files) & set(b.files)):
                difference = largest_difference(a[name], b[name])
                bitwise = np.array_equal(a[name], b[name])
                failures += difference > args.atol
                state = "bitwise equal" if bitwise else f"max |difference| {difference:.3e}"
                print(f"{path.name} {name} {a[name].shape}: {state}")
    first = metric_values(json.loads((args.first / "results.json").read_text()))
    second = metric_values(json.loads((args.second / "results.json").read_text()))
    if set(first) != set(second):
        print(f"metrics in one run only: {sorted(set(first) ^ set(second))[:10]}")
        failures += 1
    worst, where, equal = 0.0, None, 0
    for key in sorted(set(first) & set(second)):
        a, b = first[key], second[key]
        if a == b:
            equal += 1
            continue
        difference = float("inf") if a is None or b is None else abs(a - b)
        if difference > worst:
            worst, where = difference, key
        failures += difference > args.atol
    shared = len(set(first) & set(second))
    print(
        f"metrics, gaps and noise ceilings: {equal} of {shared} values equal; largest "
        f"difference {worst:.3e} at {where}"
    )
    print("no number changed" if not failures else f"{failures} difference(s) beyond {args.atol}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
