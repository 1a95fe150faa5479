"""Time and peak memory of `replay` (the exact derivative through the recorded training run)
against `exact` (the dense Hessian solve) on the same test points of digits-mlp.

Both score ``--test-points`` test points against all 1,437 training points (fit + scores),
pinned to ``--threads`` torch/BLAS threads, in ``--rounds`` alternating rounds, each in a fresh
measurement of peak resident memory (fidelity.memory.PeakMemory: the increase over the block's
start). replay's fit records the run (one epoch per checkpoint); its scores walk back through
all 2,300 steps, one vector-Jacobian product per step vmapped over the test points, each stretch
between checkpoints recomputed. Prints medians, spreads, peak memory, the load average and the
Pearson correlation of the two (they estimate different things: replay the effect through the
run, exact the influence at an assumed optimum).

    python -m benchmarks.replay [--test-points 50] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.fair import machine, pinned
from fidelity.estimators import ExactEstimator, ReplayEstimator
from fidelity.memory import PeakMemory
from fidelity.problems import load_problem
from fidelity.retrain import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-points", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--damping", type=float, default=0.01)
    args = parser.parse_args()
    trained = train(load_problem("digits-mlp"))
    problem = trained.problem
    test = problem.test.subset(torch.arange(args.test_points))
    contenders = {
        "replay": lambda: ReplayEstimator(),
        "exact": lambda: ExactEstimator(damping=args.damping),
    }
    print(
        f"digits-mlp: {args.test_points} test x {problem.n_train} train, p = {trained.n_params}, "
        f"{args.rounds} alternating rounds at {args.threads} threads; {machine()}"
    )
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    memory: dict[str, list[int]] = {name: [] for name in contenders}
    scores = {}

    for round_ in range(args.rounds):
        order = list(contenders) if round_ % 2 == 0 else list(contenders)[::-1]
        for name in order:
            with pinned(args.threads), PeakMemory() as peak:
                start = time.perf_counter()
                scores[name] = contenders[name]().fit(trained).scores(test, problem.train)
                seconds[name].append(time.perf_counter() - start)
            memory[name].append(peak.peak_increase or 0)
    for name in contenders:
        values = np.array(seconds[name])
        print(
            f"  {name:<7} median {np.median(values):7.2f} s [{values.min():.2f}, "
            f"{values.max():.2f}]  peak memory increase {max(memory[name]) / 2**20:7.1f} MiB"
        )
    ratio = np.median(seconds["replay"]) / np.median(seconds["exact"])
    r = np.corrcoef(scores["replay"].flatten(), scores["exact"].flatten())[0, 1]
    print(f"  replay / exact time: {ratio:.2f}; Pearson(replay, exact) {r:.4f}; after: {machine()}")


if __name__ == "__main__":
    main()
