"""LiSSA head to head with pyDVL on digits-mlp (50 test x 1,437 train, damping 0.01, depth
1000, one minibatch of 512 per step, our fitted scale for both), alternating rounds so drift in
machine load hits both alike. Needs the peers environment:

    .peers-venv/bin/python -m benchmarks.lissa_head_to_head [--rounds 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

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
    reference = exact.scores(test, train_set).flatten().numpy()

    def agreement(scores: torch.Tensor) -> float:
        return float(np.corrcoef(scores.flatten().numpy(), reference)[0, 1])

    lissa = ESTIMATORS.get("lissa")
    scale = lissa(**SETTINGS).fit(trained).diagnostics["scale"]
    for round_ in range(args.rounds):
        start = time.perf_counter()
        ours = lissa(**SETTINGS).fit(trained).scores(test, train_set)
        ours_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer = PydvlEstimator(
                solver="lissa", damping=SETTINGS["damping"], scale=scale, depth=SETTINGS["depth"]
            )
            theirs = peer.fit(trained).scores(test, train_set)
        peer_seconds = time.perf_counter() - start
        print(
            f"round {round_}: ours {ours_seconds:.2f} s r(exact) {agreement(ours):.5f} | "
            f"pydvl {peer_seconds:.2f} s r(exact) {agreement(theirs):.5f} | "
            f"ours/pydvl {ours_seconds / peer_seconds:.2f}"
        )


if __name__ == "__main__":
    main()
