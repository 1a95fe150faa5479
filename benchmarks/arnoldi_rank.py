"""Fidelity of `arnoldi` against `exact` as a function of the rank k (digits-logreg by default).

Prints, for each k, the pooled Pearson correlation with `exact` over 20 test x all training
points, the relative error, and the fit time.

    python -m benchmarks.arnoldi_rank [--problem digits-logreg] [--ranks 10 25 50 100 200 400 650]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fidelity.estimators import ArnoldiEstimator, ExactEstimator
from fidelity.problems import load_problem
from fidelity.retrain import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-logreg")
    parser.add_argument("--ranks", type=int, nargs="+")
    parser.add_argument("--damping", type=float, default=0.0)
    args = parser.parse_args()

    trained = train(load_problem(args.problem))
    problem = trained.problem
    p = trained.n_params
    ranks = args.ranks or sorted({10, 25, 50, 100, 200, 400, p})
    test = problem.test.subset(torch.arange(0, problem.n_test, max(1, problem.n_test // 20)))
    reference = ExactEstimator(damping=args.damping).fit(trained).scores(test, problem.train)
    print(
        f"{args.problem}: p = {p}, {len(test)} test x {problem.n_train} train, "
        f"damping {args.damping:g}"
    )
    print(f"{'rank':>6} {'krylov':>7} {'pearson':>9} {'rel. error':>11} {'seconds':>8}")
    for rank in ranks:
        start = time.perf_counter()
        estimator = ArnoldiEstimator(
            rank=min(rank, p), iterations=min(2 * rank, p), damping=args.damping
        ).fit(trained)
        predicted = estimator.scores(test, problem.train)
        seconds = time.perf_counter() - start
        r = np.corrcoef(predicted.flatten(), reference.flatten())[0, 1]
        error = float((predicted - reference).norm() / reference.norm())
        steps = estimator.diagnostics["krylov_steps"]
        print(f"{rank:>6} {steps:>7} {r:>9.5f} {error:>11.3e} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
