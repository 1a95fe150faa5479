"""The `warm` stage with the optimizer resumed or restarted, on the removals of an earlier run.

For each (epochs, optimizer) setting: the no-removal control's drift (mean |delta| of the test
losses), the pooled Pearson of the warm deltas with the run's `cold` deltas, and with each of
the run's estimators. Uses the run's test points and removed training points, so the figures
compare with its results.json; retrains are cached in ``--cache-dir`` like a run's.

    fidelity run nightly --problem movies-minilm-finetune --out runs/ft --cache-dir CACHE
    python -m benchmarks.warm_optimizer_state --run runs/ft --cache-dir CACHE \\
        [--problem movies-minilm-finetune] [--setting 1:resume --setting 1:fresh ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fidelity.core.cache import ArtifactCache
from fidelity.metrics import pearson
from fidelity.problems import load_problem
from fidelity.reports import load_problem_arrays
from fidelity.results import RunResults
from fidelity.retrain import Execution, WarmResponse, train

DEFAULT_SETTINGS = ("1:resume", "1:fresh", "2:resume", "4:resume", "4:fresh")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", type=Path, required=True, help="run directory to take removals from"
    )
    parser.add_argument("--problem", default="movies-minilm-finetune")
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument(
        "--setting", action="append", help="EPOCHS:resume|fresh (repeatable)", default=None
    )
    args = parser.parse_args()
    results = RunResults.load(args.run)
    summary = next(p for p in results.problems.values() if args.problem in (p.name, p.requested_as))
    arrays = load_problem_arrays(args.run, summary)
    cache = ArtifactCache(args.cache_dir)
    # The text problems keep their encodings in the same cache.
    problem = load_problem(args.problem, cache=cache)
    trained = train(problem, cache=cache)
    test = problem.test.subset(torch.as_tensor(arrays["test_index"]))
    removed = torch.as_tensor(arrays["removed_index"])
    cold = arrays["response/cold"]
    estimators = sorted(k.split("/", 1)[1] for k in arrays if k.startswith("estimator/"))
    print(f"{args.problem}: {len(test)} test points x {len(removed)} removals")
    for setting in args.setting or DEFAULT_SETTINGS:
        epochs, optimizer = setting.split(":")
        start = time.perf_counter()
        response = WarmResponse(epochs=int(epochs), optimizer=optimizer, group_size=args.group_size)
        result = response.compute(trained, test, removed, Execution(cache=cache))
        warm = result.deltas.numpy()
        with_estimators = "  ".join(
            f"{name} {pearson(arrays[f'estimator/{name}'], warm):.3f}" for name in estimators
        )
        print(
            f"epochs {epochs} {optimizer:6s}  drift {result.info['drift_mean_abs']:.3f}  "
            f"warm~cold {pearson(warm, cold):.3f}  estimators~warm: {with_estimators}  "
            f"({time.perf_counter() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
