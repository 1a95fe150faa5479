"""Time to score 50 test x all 1,437 training points of digits-mlp, for every estimator.

Each estimator is timed for fit + scores and compared (pooled Pearson, relative error) with its
dense reference at the same damping: `exact` for Hessian-based solvers, `gnh` for Gauss-Newton
ones and the baselines. Settings are those of the bundled `solvers` suite for digits-mlp.
Peer libraries (pydvl, torch-influence, captum) are reported as importable or not; scoring them
needs the adapters of the peers work (`estimators` external adapters), so none is run here.

    python -m benchmarks.estimators [--problem digits-mlp] [--test-points 50]
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch

from estimators import ESTIMATORS
from fidelity.problems import load_problem
from fidelity.suite import build_component, load_suite
from retrain import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-mlp")
    parser.add_argument("--test-points", type=int, default=50)
    args = parser.parse_args()

    trained = train(load_problem(args.problem))
    problem = trained.problem
    test = problem.test.subset(torch.arange(args.test_points))
    suite = load_suite("solvers")
    results = {}
    for spec in suite.estimators:
        settings = spec.settings_for(args.problem)
        estimator = build_component(ESTIMATORS, spec.kind, settings, where=spec.label)
        start = time.perf_counter()
        scores = estimator.fit(trained).scores(test, problem.train)
        results[spec.label] = (time.perf_counter() - start, scores, settings)

    def reference_for(settings: dict) -> str:
        return "exact" if settings.get("curvature", "hessian") == "hessian" else "gnh"

    print(
        f"{args.problem}: {args.test_points} test x {problem.n_train} train, "
        f"p = {trained.n_params}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'estimator':<10} {'seconds':>8} {'reference':>10} {'pearson':>9} {'rel.err':>9}")
    for label, (seconds, scores, settings) in results.items():
        kind = next(s.kind for s in suite.estimators if s.label == label)
        reference = "gnh" if kind in ("gnh", "grad-dot", "grad-cos") else reference_for(settings)
        expected = results[reference][1]
        r = np.corrcoef(scores.flatten(), expected.flatten())[0, 1]
        error = float((scores - expected).norm() / expected.norm())
        print(f"{label:<10} {seconds:>8.2f} {reference:>10} {r:>9.5f} {error:>9.2e}")
    for peer in ("pydvl", "torch_influence", "captum"):
        found = importlib.util.find_spec(peer) is not None
        print(
            f"peer {peer}: {'importable (adapter not yet written)' if found else 'not installed'}"
        )


if __name__ == "__main__":
    main()
