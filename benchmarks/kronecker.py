"""How much fidelity Kronecker-factored curvature gives up: `kfac` and `ekfac` with each Fisher
against the exact Gauss-Newton (`gnh`) and Hessian (`exact`) solves at the same absolute
damping, on digits-mlp and digits-cnn (20 test points x every training point).

    python -m benchmarks.kronecker [--damping 0.01] [--test-points 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fidelity.estimators import ESTIMATORS
from fidelity.problems import load_problem
from fidelity.retrain import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--test-points", type=int, default=20)
    parser.add_argument("--problems", nargs="+", default=["digits-mlp", "digits-cnn"])
    args = parser.parse_args()
    for name in args.problems:
        trained = train(load_problem(name))
        problem = trained.problem
        test = problem.test.subset(torch.arange(args.test_points))
        references = {
            kind: ESTIMATORS.get(kind)(damping=args.damping)
            .fit(trained)
            .scores(test, problem.train)
            .flatten()
            .numpy()
            for kind in ("gnh", "exact")
        }
        print(f"{name}: {trained.n_params} parameters, damping {args.damping:g} (absolute)")
        for kind in ("kfac", "ekfac"):
            for fisher in ("expected", "sampled", "empirical"):
                start = time.perf_counter()
                estimator = ESTIMATORS.get(kind)(damping=args.damping, fisher=fisher).fit(trained)
                scores = estimator.scores(test, problem.train).flatten().numpy()
                seconds = time.perf_counter() - start
                r_gnh = np.corrcoef(scores, references["gnh"])[0, 1]
                r_exact = np.corrcoef(scores, references["exact"])[0, 1]
                print(
                    f"  {kind:5s} {fisher:9s} {seconds:6.2f} s  Pearson vs gnh {r_gnh:.4f}  "
                    f"vs exact {r_exact:.4f}  factors {estimator.diagnostics['factor_bytes']} B"
                )


if __name__ == "__main__":
    main()
