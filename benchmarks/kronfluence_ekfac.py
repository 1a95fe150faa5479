"""Our `kfac`/`ekfac` against kronfluence's on digits-mlp with identical settings (same Fisher,
damping_factor = wd + damping, float64 throughout): time of each and the Pearson correlation
and largest relative difference of the scores (kronfluence's converted to our convention).
Timed fairly (benchmarks/fair.py): both pinned to 1 and to 2 threads, ``--rounds`` alternating
rounds, each side's median at its best thread count. Needs the peers environment:

    bash benchmarks/peers_env.sh
    .peers-venv/bin/python -m benchmarks.kronfluence_ekfac [--damping 0.01] [--test-points 50]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.fair import alternate, machine
from fidelity.estimators import EkfacEstimator, KfacEstimator
from fidelity.estimators.external.kronfluence import KronfluenceEstimator
from fidelity.problems import load_problem
from fidelity.retrain import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-mlp")
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--test-points", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trained = train(load_problem(args.problem))
    problem = trained.problem
    test = problem.test.subset(torch.arange(args.test_points))
    print(
        f"{args.problem}: {args.test_points} test x {problem.n_train} train, damping "
        f"{args.damping:g} (kronfluence damping_factor {problem.weight_decay + args.damping:g}), "
        f"{args.rounds} alternating rounds at 1 and 2 threads; {machine()}"
    )
    for ours_cls, strategy in ((KfacEstimator, "kfac"), (EkfacEstimator, "ekfac")):
        for fisher in ("empirical", "sampled"):
            ours = ours_cls(damping=args.damping, fisher=fisher)
            theirs = KronfluenceEstimator(strategy=strategy, fisher=fisher, damping=args.damping)
            timings = alternate(
                {
                    "ours": lambda e=ours: e.fit(trained).scores(test, problem.train),
                    "kronfluence": lambda e=theirs: e.fit(trained).scores(test, problem.train),
                },
                args.rounds,
            )
            (ours_threads, ours_seconds) = timings.best("ours")
            (theirs_threads, theirs_seconds) = timings.best("kronfluence")
            ours_scores = timings.outputs["ours"].flatten().numpy()
            theirs_scores = timings.outputs["kronfluence"].flatten().numpy()
            r = np.corrcoef(ours_scores, theirs_scores)[0, 1]
            relative = np.abs(ours_scores - theirs_scores).max() / np.abs(theirs_scores).max()
            spread = {
                name: timings.seconds[(name, threads)]
                for name, threads in (("ours", ours_threads), ("kronfluence", theirs_threads))
            }
            print(
                f"  {strategy:5s} {fisher:9s} ours {ours_seconds:6.2f} s "
                f"[{min(spread['ours']):.2f}, {max(spread['ours']):.2f}] ({ours_threads}t)  "
                f"kronfluence {theirs_seconds:6.2f} s [{min(spread['kronfluence']):.2f}, "
                f"{max(spread['kronfluence']):.2f}] ({theirs_threads}t)  ratio "
                f"{theirs_seconds / ours_seconds:5.1f}x  Pearson {r:.6f}  max rel diff "
                f"{relative:.2e}"
            )
    print(f"  after: {machine()}")


if __name__ == "__main__":
    main()
