"""LiSSA head to head with pyDVL on digits-mlp (50 test x 1,437 train, damping 0.01, depth
1000, one minibatch of 512 per step, our fitted scale for both), alternating two rounds so
machine noise hits both alike. Needs the peers environment:

    .peers-venv/bin/python -m benchmarks.lissa_head_to_head
"""

import time
import warnings

import numpy as np
import torch

from estimators import ESTIMATORS
from estimators.external.pydvl import PydvlEstimator
from fidelity.problems import load_problem
from retrain import train

trained = train(load_problem("digits-mlp"))
problem = trained.problem
test = problem.test.subset(torch.arange(50))
exact = (
    ESTIMATORS.get("exact")(damping=0.01).fit(trained).scores(test, problem.train).flatten().numpy()
)
settings = dict(damping=0.01, scale="auto", depth=1000, minibatch_size=512)
scale = ESTIMATORS.get("lissa")(**settings).fit(trained).diagnostics["scale"]
for round_ in range(2):  # alternate, so drift in machine load hits both
    t = time.perf_counter()
    ours = ESTIMATORS.get("lissa")(**settings).fit(trained).scores(test, problem.train)
    to = time.perf_counter() - t
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = (
            PydvlEstimator(solver="lissa", damping=0.01, scale=scale, depth=1000)
            .fit(trained)
            .scores(test, problem.train)
        )
    tp = time.perf_counter() - t
    r = lambda s: np.corrcoef(s.flatten().numpy(), exact)[0, 1]
    print(
        f"round {round_}: ours {to:.2f} s r {r(ours):.5f} | pydvl {tp:.2f} s r {r(theirs):.5f} | ratio ours/pydvl {to / tp:.2f}"
    )
