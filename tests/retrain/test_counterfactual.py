"""Top-k counterfactual removal: the right points are dropped, the right model is retrained."""

import numpy as np
import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.training import train_minibatch
from fidelity.retrain import CounterfactualResponse, Execution, train
from fidelity.retrain.subsets import measurement
from tests.retrain.test_subsets import RECIPE, network


def test_each_ranking_drops_its_top_k_and_is_measured_on_its_test_point():
    problem = network()
    trained = train(problem)
    test = problem.test.subset(torch.arange(3))
    rng = np.random.default_rng(0)
    scores = {"made-up": rng.standard_normal((3, problem.n_train))}
    response = CounterfactualResponse(ks=[2, 5], seeds=1)
    result = response.compute(trained, test, scores, Execution())
    assert result.methods == ("made-up", "random", "highest loss")
    assert result.change.shape == (1, 3, 3, 2)
    # by hand: test point 1, k = 5, the made-up ranking's five largest deltas removed
    mask = torch.ones(1, problem.n_train, dtype=torch.float64)
    mask[0, np.argsort(-scores["made-up"][1])[:5]] = 0
    theta = train_minibatch(trained.model, problem, RECIPE, trained.model.initial_theta(), mask)
    after = measurement(trained, theta.thetas, test, "loss")[0, 1]
    before = measurement(trained, trained.theta.unsqueeze(0), test, "loss")[0, 1]
    assert float(result.change[0, 0, 1, 1]) == pytest.approx(float(after - before), abs=1e-12)
    logits = trained.model(theta.thetas[0], test.x[1:2])
    assert bool(result.correct_after[0, 0, 1, 1]) == bool(logits.argmax() == test.y[1])
    assert result.correct_before.shape == (1, 3)


def test_rankings_put_the_most_helpful_first_and_the_baselines_are_seeded():
    problem = network()
    trained = train(problem)
    scores = {"s": np.tile(np.arange(problem.n_train, dtype=float), (2, 1))}
    response = CounterfactualResponse(ks=[3], seed=4)
    found = response.rankings(trained, scores, 2)
    assert found["s"][0, :3].tolist() == [
        problem.n_train - 1,
        problem.n_train - 2,
        problem.n_train - 3,
    ]
    again = CounterfactualResponse(ks=[3], seed=4).rankings(trained, scores, 2)
    assert np.array_equal(found["random"], again["random"])
    assert sorted(found["random"][0].tolist()) == list(range(problem.n_train))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ks": []}, "non-empty"),
        ({"ks": [5, 2]}, "increasing"),
        ({"ks": [0]}, "counterfactual.ks"),
        ({"target": "accuracy"}, "target must be one of"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(FidelityError, match=message):
        CounterfactualResponse(**settings)


def test_a_budget_that_leaves_too_few_points_is_refused():
    problem = network()
    trained = train(problem)
    scores = {"s": np.zeros((1, problem.n_train))}
    with pytest.raises(FidelityError, match="leaves too few"):
        CounterfactualResponse(ks=[problem.n_train]).compute(
            trained, problem.test.subset(torch.arange(1)), scores
        )
