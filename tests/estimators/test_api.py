"""One contract test over every registered estimator."""

import dataclasses

import numpy as np
import pytest
import torch

from fidelity.core.problem import MinibatchRecipe
from fidelity.estimators import ESTIMATORS, Estimator
from fidelity.retrain import train
from tests.conftest import make_tiny_logreg


@pytest.fixture(scope="module")
def tiny_problems():
    """The tiny problem trained by Newton, and by full-batch gradient descent for the
    estimators that follow the training run."""
    problem = make_tiny_logreg()
    path = MinibatchRecipe(
        optimizer="sgd", learning_rate=0.5, momentum=0.5, epochs=60, batch_size=40
    )
    return {False: train(problem), True: train(dataclasses.replace(problem, recipe=path))}


@pytest.fixture(scope="module")
def tiny_trained(tiny_problems):
    return tiny_problems[False]


@pytest.fixture(scope="module")
def required_settings(tiny_trained, tmp_path_factory):
    """Settings without a default: the `scores` estimator reads a file (exact's scores here)."""
    problem = tiny_trained.problem
    path = tmp_path_factory.mktemp("scores") / "exact.npy"
    exact = ESTIMATORS.get("exact")().fit(tiny_trained).scores(problem.test, problem.train)
    np.save(path, exact.numpy())
    return {"scores": {"path": str(path)}}


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_estimator_contract(name, tiny_problems, required_settings):
    cls = ESTIMATORS.get(name)
    tiny_trained = tiny_problems[cls.training_path]
    problem = tiny_trained.problem
    settings = required_settings.get(name, {})
    estimator = cls(**settings)
    assert isinstance(estimator, Estimator)
    assert not any(attr.endswith("_") and not attr.startswith("_") for attr in vars(estimator))
    params_before = {k: v.clone() for k, v in tiny_trained.model.module.state_dict().items()}
    theta_before = tiny_trained.theta.clone()

    assert estimator.fit(tiny_trained) is estimator
    test, train_subset = problem.test.subset(torch.arange(5)), problem.train.subset(torch.arange(7))
    first = estimator.scores(test, train_subset)
    second = cls(**settings).fit(tiny_trained).scores(test, train_subset)

    assert first.shape == (5, 7)
    assert first.dtype == problem.dtype
    assert bool(torch.isfinite(first).all())
    assert torch.equal(first, second)  # deterministic
    assert torch.equal(tiny_trained.theta, theta_before)
    for key, value in tiny_trained.model.module.state_dict().items():
        assert torch.equal(value, params_before[key])
    assert isinstance(estimator.diagnostics, dict) and "fit_seconds" in estimator.diagnostics
    assert set(estimator.get_params()) <= set(vars(estimator))


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_scores_rows_follow_test_and_columns_follow_train(name, tiny_problems, required_settings):
    cls = ESTIMATORS.get(name)
    tiny_trained = tiny_problems[cls.training_path]
    problem = tiny_trained.problem
    estimator = cls(**required_settings.get(name, {})).fit(tiny_trained)
    full = estimator.scores(problem.test, problem.train)
    rows, cols = torch.tensor([4, 1]), torch.tensor([9, 0, 3])
    part = estimator.scores(problem.test.subset(rows), problem.train.subset(cols))
    torch.testing.assert_close(part, full[rows][:, cols], rtol=1e-12, atol=1e-15)
