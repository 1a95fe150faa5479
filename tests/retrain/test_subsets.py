"""Retraining under weight masks and the `subsets` response: closed forms, targets, invariances."""

import math

import numpy as np
import pytest
import torch

from fidelity.core.cache import ArtifactCache
from fidelity.core.errors import FidelityError
from fidelity.core.objective import objective
from fidelity.retrain import Execution, SubsetsResponse, train
from fidelity.retrain.subsets import draw_masks, measurement, retrain_masks
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem
from tests.fidelity.test_training import RECIPE


def test_masks_keep_round_alpha_n_points_and_are_seeded():
    masks = draw_masks(50, (0.5, 0.9), 4, seed=3)
    assert masks.shape == (8, 50)
    assert set(np.unique(masks)) == {0.0, 1.0}
    assert (masks[:4].sum(1) == 25).all() and (masks[4:].sum(1) == 45).all()
    assert np.array_equal(masks, draw_masks(50, (0.5, 0.9), 4, seed=3))
    assert not np.array_equal(masks, draw_masks(50, (0.5, 0.9), 4, seed=4))
    # an alpha's draws do not depend on the other alphas of the run
    assert np.array_equal(masks[4:], draw_masks(50, (0.9,), 4, seed=3))


@pytest.mark.parametrize(
    ("alphas", "count", "message"),
    [
        ((1.0,), 2, r"alpha must lie in \(0, 1\)"),
        ((0.0,), 2, r"alpha must lie in \(0, 1\)"),
        ((0.01,), 2, "keeps 0 of 5"),
        ((0.4,), 11, "more than the 10 distinct ones"),
    ],
)
def test_impossible_draws_are_refused(alphas, count, message):
    with pytest.raises(FidelityError, match=message):
        draw_masks(5, alphas, count, seed=0)


def test_ridge_subset_refits_equal_the_closed_form(trained_problems):
    """argmin (1/N) sum_i w_i 0.5 (x_i^T t - y_i)^2 + (wd/2)|t|^2
    = (X^T W X + N wd I)^{-1} X^T W y."""
    trained = trained_problems("diabetes-ridge")
    problem = trained.problem
    masks = torch.as_tensor(draw_masks(problem.n_train, (0.5, 0.9), 3, seed=0))
    masks[0, :5] = 0.5  # fractional weights are weights too
    refits = retrain_masks(trained, masks, Execution())
    design = torch.cat([problem.x_train, torch.ones(problem.n_train, 1)], dim=1)
    n, p = design.shape
    for row, weights in enumerate(masks):
        system = design.T @ (weights[:, None] * design) + n * problem.weight_decay * torch.eye(p)
        expected = torch.linalg.solve(system, design.T @ (weights * problem.y_train[:, 0]))
        error = float((refits.thetas[row] - expected).norm() / expected.norm())
        assert error <= 1e-8, (row, error)


def test_measurement_targets_follow_their_definitions():
    trained = train(make_tiny_logreg())
    problem, model = trained.problem, trained.model
    test = problem.test
    thetas = trained.theta.unsqueeze(0)
    outputs = model(trained.theta, test.x)
    loss = torch.nn.functional.cross_entropy(outputs, test.y, reduction="none")
    torch.testing.assert_close(measurement(trained, thetas, test, "loss")[0], loss)
    torch.testing.assert_close(measurement(trained, thetas, test, "log-probability")[0], -loss)
    probability = torch.softmax(outputs, dim=1).gather(1, test.y.unsqueeze(1))[:, 0]
    margin = measurement(trained, thetas, test, "margin")[0]
    torch.testing.assert_close(margin, torch.log(probability / (1 - probability)))
    for t in range(len(test)):  # the logit of the true class minus the logsumexp of the others
        logits = outputs[t].tolist()
        others = [v for c, v in enumerate(logits) if c != int(test.y[t])]
        expected = logits[int(test.y[t])] - math.log(sum(math.exp(v) for v in others))
        assert float(margin[t]) == pytest.approx(expected, abs=1e-12)
    binary = train(make_tiny_mlp_problem("bce"))
    logit = binary.model(binary.theta, binary.problem.test.x)[:, 0]
    sign = 2 * binary.problem.test.y[:, 0] - 1
    torch.testing.assert_close(
        measurement(binary, binary.theta.unsqueeze(0), binary.problem.test, "margin")[0],
        sign * logit,
    )
    mse = train(make_tiny_mlp_problem("mse"))
    with pytest.raises(FidelityError, match="needs a classification loss"):
        measurement(mse, mse.theta.unsqueeze(0), mse.problem.test, "margin")


def network():
    problem = make_tiny_mlp_problem("cross_entropy", n_train=30)
    return type(problem)(**{**vars(problem), "recipe": RECIPE})


def test_subset_deltas_are_paired_with_each_seeds_full_model(tmp_path):
    problem = network()
    trained = train(problem)
    response = SubsetsResponse(alphas=[0.8], subsets=3, seeds=2)
    result = response.compute(trained, problem.test, Execution(cache=ArtifactCache(tmp_path)))
    assert result.per_seed.shape == (2, 3, len(problem.test))
    assert result.masks.shape == (3, problem.n_train) and torch.all(result.alphas == 0.8)
    # seed 0: a model trained by hand on the first mask, against theta_s
    from fidelity.core.training import train_minibatch

    mask = result.masks[:1].to(trained.theta)
    theta = train_minibatch(trained.model, problem, RECIPE, trained.model.initial_theta(), mask)
    expected = measurement(trained, theta.thetas, problem.test, "loss") - measurement(
        trained, trained.theta.unsqueeze(0), problem.test, "loss"
    )
    torch.testing.assert_close(result.per_seed[0, :1], expected, rtol=0, atol=1e-12)
    again = SubsetsResponse(alphas=[0.8], subsets=3, seeds=2).compute(
        trained, problem.test, Execution(cache=ArtifactCache(tmp_path))
    )
    assert again.info["refits"] == 0 and again.info["cached"] == 6
    assert torch.equal(again.per_seed, result.per_seed)


def test_a_convex_problem_measures_its_unique_refit_once(trained_problems):
    trained = trained_problems("cancer-logreg")
    result = SubsetsResponse(alphas=[0.9], subsets=2, seeds=3).compute(
        trained, trained.problem.test
    )
    assert result.per_seed.shape[0] == 1 and result.info["seeds"] == 1


def test_subset_results_do_not_depend_on_backend_workers_or_group_size():
    problem = network()
    trained = train(problem)
    masks = torch.as_tensor(draw_masks(problem.n_train, (0.7,), 5, seed=1))
    reference = retrain_masks(trained, masks, Execution(), group_size=5).thetas
    # (the threading backend is left out: functional_call on one shared module is not
    # thread-safe, for every stage; dask is checked in test_execution.py)
    for execution, group_size in (
        (Execution(), 2),
        (Execution(), 3),
        (Execution(workers=2, backend="loky"), 2),
    ):
        thetas = retrain_masks(trained, masks, execution, group_size=group_size).thetas
        assert all(torch.equal(thetas[i], reference[i]) for i in range(5))


def test_all_ones_mask_reproduces_theta_s():
    problem = network()
    trained = train(problem)
    refits = retrain_masks(
        trained, torch.ones(1, problem.n_train, dtype=torch.float64), Execution()
    )
    torch.testing.assert_close(refits.thetas[0], trained.theta, rtol=0, atol=1e-12)
    gradient = torch.func.grad(lambda t: objective(trained.model, problem, t))(trained.theta)
    assert refits.grad_norms[0] == pytest.approx(float(gradient.norm()), rel=1e-9)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"alphas": [1.5]}, r"alphas must lie in \(0, 1\)"),
        ({"alphas": []}, "non-empty"),
        ({"alphas": [0.5, 0.5]}, "twice"),
        ({"target": "accuracy"}, "target must be one of"),
        ({"subsets": 0}, "subsets.subsets"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(FidelityError, match=message):
        SubsetsResponse(**settings)
