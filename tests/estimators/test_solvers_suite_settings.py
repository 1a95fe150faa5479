"""The solvers suite's documented settings reach the dense reference on digits-logreg."""

import numpy as np
import pytest
import torch

from fidelity.estimators import ESTIMATORS, ArnoldiEstimator
from fidelity.suite import build_component, load_suite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setting(trained_problems):
    trained = trained_problems("digits-logreg")
    problem = trained.problem
    test = problem.test.subset(torch.arange(0, problem.n_test, 18))  # 20 test points
    reference = ESTIMATORS.get("exact")().fit(trained).scores(test, problem.train)
    return trained, test, reference.flatten().numpy()


@pytest.mark.parametrize("label", ["cg", "cg-gnh", "lissa", "gnh"])
def test_suite_settings_reach_exact(setting, label):
    trained, test, reference = setting
    suite = load_suite("solvers")
    spec = next(s for s in suite.estimators if s.label == label)
    estimator = build_component(
        ESTIMATORS, spec.kind, suite.settings_for(spec, "digits-logreg"), where=label
    )
    predicted = estimator.fit(trained).scores(test, trained.problem.train).flatten().numpy()
    assert np.corrcoef(predicted, reference)[0, 1] >= 0.98


def test_arnoldi_at_full_rank_reaches_exact(setting):
    trained, test, reference = setting
    p = trained.n_params
    estimator = ArnoldiEstimator(rank=p, iterations=p).fit(trained)
    predicted = estimator.scores(test, trained.problem.train).flatten().numpy()
    assert np.corrcoef(predicted, reference)[0, 1] >= 0.98
