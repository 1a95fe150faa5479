"""DataInf against its closed form, layer by layer."""

import dataclasses

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_grads
from fidelity.estimators import DataInfEstimator
from fidelity.estimators.datainf import layer_slices
from fidelity.retrain import train
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem


def relative(a, b):
    return float((a - b).norm() / b.norm())


def datainf_inverse(grads, damping):
    """(1/N) sum_i (1/lambda) (I - g_i g_i^T / (lambda + ||g_i||^2)), summed term by term."""
    n, p = grads.shape
    total = torch.zeros(p, p, dtype=grads.dtype)
    for g in grads:
        total += (torch.eye(p, dtype=grads.dtype) - torch.outer(g, g) / (damping + g @ g)) / damping
    return total / n


@pytest.mark.parametrize("damping", ["auto", 0.05])
def test_one_layer_model_equals_the_closed_form(damping):
    trained = train(make_tiny_logreg())
    problem = trained.problem
    grads = per_example_grads(trained.model, problem.loss, trained.theta, problem.train)
    test_grads = per_example_grads(trained.model, problem.loss, trained.theta, problem.test)
    used = damping if damping != "auto" else 0.1 * float(grads.pow(2).sum(1).mean())
    expected = test_grads @ datainf_inverse(grads, used) @ grads.T / problem.n_train
    estimator = DataInfEstimator(damping=damping).fit(trained)
    assert relative(estimator.scores(problem.test, problem.train), expected) <= 1e-12
    assert estimator.diagnostics["damping"] == {"": pytest.approx(used, rel=1e-12)}


def test_a_network_gets_one_block_per_layer():
    trained = train(make_tiny_mlp_problem(loss="cross_entropy"))
    problem = trained.problem
    layers = layer_slices(trained.model)
    assert [name for name, _ in layers] == ["0", "2"]
    assert layers[-1][1].stop == trained.n_params
    grads = per_example_grads(trained.model, problem.loss, trained.theta, problem.train)
    test_grads = per_example_grads(trained.model, problem.loss, trained.theta, problem.test)
    expected = torch.zeros(problem.n_test, problem.n_train, dtype=grads.dtype)
    for _, where in layers:
        block = grads[:, where]
        damping = 0.1 * float(block.pow(2).sum(1).mean())
        expected += test_grads[:, where] @ datainf_inverse(block, damping) @ block.T
    expected /= problem.n_train
    scores = DataInfEstimator().fit(trained).scores(problem.test, problem.train)
    assert relative(scores, expected) <= 1e-12


def test_one_training_point_is_the_exact_damped_inverse():
    # when every training point is the same point the average of the inverses is the inverse
    # of the average
    problem = make_tiny_logreg(n_train=2)
    problem = dataclasses.replace(
        problem, x_train=problem.x_train[[0, 0]], y_train=problem.y_train[[0, 0]]
    )
    trained = train(problem)
    g = per_example_grads(trained.model, problem.loss, trained.theta, problem.train)
    test_grads = per_example_grads(trained.model, problem.loss, trained.theta, problem.test)
    curvature = torch.outer(g[0], g[0]) + 0.3 * torch.eye(trained.n_params, dtype=g.dtype)
    expected = test_grads @ torch.linalg.solve(curvature, g.T) / 2
    scores = DataInfEstimator(damping=0.3).fit(trained).scores(problem.test, problem.train)
    assert relative(scores, expected) <= 1e-12


def test_zero_damping_is_refused():
    with pytest.raises(FidelityError, match=r"datainf\.damping must be positive"):
        DataInfEstimator(damping=0.0)
