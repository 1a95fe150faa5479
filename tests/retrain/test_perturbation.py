"""Retraining with a moved training input: exact Newton refits and paired minibatch retrains."""

import dataclasses

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.problem import FunctionalModel, MinibatchRecipe
from fidelity.core.training import train_minibatch
from fidelity.retrain import train
from fidelity.retrain.newton import newton_minimize
from fidelity.retrain.perturbation import retrain_perturbed
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem


def test_perturbed_newton_refits_are_the_refits_of_the_moved_data():
    trained = train(make_tiny_logreg())
    problem = trained.problem
    steps = 0.3 * torch.ones(2, 3, dtype=torch.float64)
    result = retrain_perturbed(trained, problem.test, torch.tensor([4, 11]), steps)
    for k, j in enumerate([4, 11]):
        x = problem.x_train.clone()
        x[j] += steps[k]
        expected = newton_minimize(
            trained.model, dataclasses.replace(problem, x_train=x), trained.theta
        ).theta
        torch.testing.assert_close(result.thetas[k], expected, rtol=0, atol=1e-12)
    with pytest.raises(FidelityError, match="must be shaped"):
        retrain_perturbed(trained, problem.test, torch.tensor([4]), torch.zeros(1, 5))
    with pytest.raises(FidelityError, match="must lie in"):
        retrain_perturbed(trained, problem.test, torch.tensor([400]), torch.zeros(1, 3))


def test_perturbed_minibatch_retrains_are_paired_with_theta_s_run():
    recipe = MinibatchRecipe(optimizer="sgd", learning_rate=0.1, epochs=3, batch_size=8)
    problem = dataclasses.replace(make_tiny_mlp_problem(), recipe=recipe)
    trained = train(problem)
    steps = 0.2 * torch.ones(2, 3, dtype=torch.float64)
    result = retrain_perturbed(trained, problem.test, torch.tensor([1, 2]), steps)
    model = FunctionalModel.of(problem.build_model())
    for k, j in enumerate([1, 2]):
        x = problem.x_train.clone()
        x[j] += steps[k]
        moved = dataclasses.replace(problem, x_train=x)
        weights = torch.ones(1, problem.n_train, dtype=torch.float64)
        alone = train_minibatch(model, moved, recipe, model.initial_theta(), weights).thetas[0]
        torch.testing.assert_close(result.thetas[k], alone, rtol=1e-10, atol=1e-12)
    zero = retrain_perturbed(trained, problem.test, torch.tensor([1]), torch.zeros(1, 3))
    assert float(zero.changes.abs().max()) == 0.0  # the unmoved run is theta_s's own
