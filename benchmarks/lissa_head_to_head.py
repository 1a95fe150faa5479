"""LiSSA head to head with pyDVL on digits-mlp (50 test x 1,437 train, damping 0.01, depth
1000, one minibatch of 512 per step, our fitted scale for both), timed fairly
(benchmarks/fair.py): both pinned to 1 and to 2 threads, alternating rounds so drift in machine
load hits both alike, each side's median at its best thread count. Needs the peers environment:

    .peers-venv/bin/python -m benchmarks.lissa_head_to_head [--rounds 2]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from benchmarks.fair import agreement, alternate, machine
from fidelity.estimators import ESTIMATORS
from fidelity.problems import load_problem
from fidelity.retrain import train

SETTINGS = {"damping": 0.01, "scale": "auto", "depth": 1000, "minibatch_size": 512}


def main() -> None:
    from fidelity.estimators.external.pydvl import PydvlEstimator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trained = train(load_problem("digits-mlp"))
    train_set, test = trained.problem.train, trained.problem.test.subset(torch.arange(50))
    exact = ESTIMATORS.get("exact")(damping=SETTINGS["damping"]).fit(trained)
    reference = exact.scores(test, train_set)
    lissa = ESTIMATORS.get("lissa")
    scale = lissa(**SETTINGS).fit(trained).diagnostics["scale"]

    def peer() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimator = PydvlEstimator(
                solver="lissa", damping=SETTINGS["damping"], scale=scale, depth=SETTINGS["depth"]
            )
            return estimator.fit(trained).scores(test, train_set)

    print(f"{args.rounds} alternating rounds at 1 and 2 threads; {machine()}")
    timings = alternate(
        {"ours": lambda: lissa(**SETTINGS).fit(trained).scores(test, train_set), "pydvl": peer},
        args.rounds,
    )
    timings.print()
    (ours_threads, ours_seconds), (peer_threads, peer_seconds) = (
        timings.best("ours"),
        timings.best("pydvl"),
    )
    print(
        f"best: ours {ours_seconds:.2f} s ({ours_threads} threads) r(exact) "
        f"{agreement(timings.outputs['ours'], reference)[0]:.5f} | pydvl {peer_seconds:.2f} s "
        f"({peer_threads} threads) r(exact) {agreement(timings.outputs['pydvl'], reference)[0]:.5f}"
        f" | ours/pydvl {ours_seconds / peer_seconds:.2f}; after: {machine()}"
    )


if __name__ == "__main__":
    main()
