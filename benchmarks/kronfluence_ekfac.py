"""Our `kfac`/`ekfac` against kronfluence's on digits-mlp with identical settings (same Fisher,
damping_factor = wd + damping, float64 throughout): time of each and the Pearson correlation
and largest relative difference of the scores (kronfluence's converted to our convention).
Needs the peers environment:

    bash benchmarks/peers_env.sh
    .peers-venv/bin/python -m benchmarks.kronfluence_ekfac [--damping 0.01] [--test-points 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fidelity.estimators import EkfacEstimator, KfacEstimator
from fidelity.estimators.external.kronfluence import KronfluenceEstimator
from fidelity.problems import load_problem
from fidelity.retrain import train


def timed_scores(estimator, trained, test) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    scores = estimator.fit(trained).scores(test, trained.problem.train)
    return time.perf_counter() - start, scores.flatten().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-mlp")
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--test-points", type=int, default=50)
    args = parser.parse_args()
    trained = train(load_problem(args.problem))
    problem = trained.problem
    test = problem.test.subset(torch.arange(args.test_points))
    print(
        f"{args.problem}: {args.test_points} test x {problem.n_train} train, damping "
        f"{args.damping:g} (kronfluence damping_factor {problem.weight_decay + args.damping:g}), "
        f"torch threads {torch.get_num_threads()}"
    )
    for ours_cls, strategy in ((KfacEstimator, "kfac"), (EkfacEstimator, "ekfac")):
        for fisher in ("empirical", "sampled"):
            ours = ours_cls(damping=args.damping, fisher=fisher)
            theirs = KronfluenceEstimator(strategy=strategy, fisher=fisher, damping=args.damping)
            ours_seconds, ours_scores = timed_scores(ours, trained, test)
            theirs_seconds, theirs_scores = timed_scores(theirs, trained, test)
            r = np.corrcoef(ours_scores, theirs_scores)[0, 1]
            relative = np.abs(ours_scores - theirs_scores).max() / np.abs(theirs_scores).max()
            print(
                f"  {strategy:5s} {fisher:9s} ours {ours_seconds:6.2f} s  kronfluence "
                f"{theirs_seconds:6.2f} s  ratio {theirs_seconds / ours_seconds:5.1f}x  "
                f"Pearson {r:.6f}  max rel diff {relative:.2e}"
            )


if __name__ == "__main__":
    main()
