"""The warm and proximal stages: equal to cold where theory says so, closed forms, drift."""

import pytest
import torch

from fidelity.core.cache import ArtifactCache
from fidelity.retrain import ColdResponse, Execution, ProximalResponse, WarmResponse, train
from tests.fidelity.test_training import network_problem


@pytest.mark.parametrize("name", ["cancer-logreg", "diabetes-ridge"])
def test_warm_and_unpenalised_proximal_equal_cold_on_convex_problems(trained_problems, name):
    trained = trained_problems(name)
    test, removed = trained.problem.test, torch.arange(0, 50, 5)
    cold = ColdResponse().compute(trained, test, removed).deltas
    for response in (WarmResponse(), ProximalResponse(damping=0.0)):
        deltas = response.compute(trained, test, removed).deltas
        assert float((deltas - cold).abs().max() / cold.abs().max()) <= 1e-10


def test_proximal_equals_closed_form_ridge(trained_problems):
    """argmin (1/N) sum_{i!=j} 0.5 (x_i^T t - y_i)^2 + (wd/2)|t|^2 + (lam/2)|t - theta_s|^2."""
    trained = trained_problems("diabetes-ridge")
    problem, damping = trained.problem, 0.3
    design = torch.cat([problem.x_train, torch.ones(problem.n_train, 1)], dim=1)
    test_design = torch.cat([problem.x_test, torch.ones(problem.n_test, 1)], dim=1)
    n, p = design.shape
    removed = torch.tensor([0, 17, 200])
    base = 0.5 * (test_design @ trained.theta - problem.y_test[:, 0]) ** 2
    expected = torch.empty(problem.n_test, 3)
    for column, j in enumerate(removed.tolist()):
        keep = torch.arange(n) != j
        x, y = design[keep], problem.y_train[keep, 0]
        system = x.T @ x / n + (problem.weight_decay + damping) * torch.eye(p)
        theta = torch.linalg.solve(system, x.T @ y / n + damping * trained.theta)
        expected[:, column] = 0.5 * (test_design @ theta - problem.y_test[:, 0]) ** 2 - base
    actual = ProximalResponse(damping=damping).compute(trained, problem.test, removed).deltas
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-14)


def heavy_ball_reference(trained, weights, epochs):
    """Continued SGD with momentum from theta_s and its momentum buffer, written out one model
    and one step at a time with autograd: J's minibatch gradient (1/|B|) sum w_i L_i + wd theta,
    batches in the recipe's seeded order (a fresh permutation of the training set per epoch)."""
    problem, recipe, model = trained.problem, trained.problem.recipe, trained.model
    generator = torch.Generator().manual_seed(recipe.order_seed)
    orders = [torch.randperm(problem.n_train, generator=generator) for _ in range(epochs)]
    theta = trained.theta.detach().clone()
    momentum = trained.optimizer_state.first[0].clone()
    for order in orders:
        for start in range(0, problem.n_train, recipe.batch_size):
            index = order[start : start + recipe.batch_size]
            point = theta.clone().requires_grad_(True)
            losses = torch.nn.functional.cross_entropy(
                model(point, problem.x_train[index]), problem.y_train[index], reduction="none"
            )
            value = (weights[index] * losses).sum() / len(index)
            value = value + 0.5 * problem.weight_decay * point.pow(2).sum()
            (grad,) = torch.autograd.grad(value, point)
            momentum = recipe.momentum * momentum + grad
            theta = theta - recipe.learning_rate * momentum
    return theta


def test_warm_on_a_network_is_paired_with_a_no_removal_control():
    problem = network_problem()
    trained = train(problem)
    removed = torch.tensor([2, 9])

    def test_loss(theta):
        outputs = trained.model(theta, problem.x_test)
        return torch.nn.functional.cross_entropy(outputs, problem.y_test, reduction="none")

    control = test_loss(heavy_ball_reference(trained, torch.ones(problem.n_train), 5))
    retrained = []
    for j in removed.tolist():
        weights = torch.ones(problem.n_train)
        weights[j] = 0
        retrained.append(test_loss(heavy_ball_reference(trained, weights, 5)))
    after = torch.stack(retrained, dim=1)
    result = WarmResponse(epochs=5).compute(trained, problem.test, removed)
    torch.testing.assert_close(result.deltas, after - control.unsqueeze(1), rtol=0, atol=1e-10)
    assert result.info["drift_mean_abs"] == pytest.approx(
        float((control - test_loss(trained.theta)).abs().mean()), rel=1e-8
    )
    assert result.info["drift_mean_abs"] > 0
    raw = WarmResponse(epochs=5, subtract_drift=False).compute(trained, problem.test, removed)
    expected_raw = after - test_loss(trained.theta).unsqueeze(1)
    torch.testing.assert_close(raw.deltas, expected_raw, rtol=0, atol=1e-10)


def test_strong_proximity_keeps_retrains_near_theta_s():
    problem = network_problem()
    trained = train(problem)
    removed = torch.arange(0, 30, 6)
    warm = WarmResponse(epochs=5).compute(trained, problem.test, removed).deltas
    pulled = ProximalResponse(damping=1.0, epochs=5).compute(trained, problem.test, removed).deltas
    assert float(pulled.norm()) < 0.3 * float(warm.norm())


def test_proximal_damping_too_stiff_for_sgd_is_refused():
    from fidelity.core.errors import FidelityError

    problem = network_problem()  # SGD, learning rate 0.1, momentum 0.9: limit 3.8 / 0.1 = 38
    trained = train(problem)
    with pytest.raises(FidelityError, match="too stiff for SGD"):
        ProximalResponse(damping=100.0, epochs=5).compute(trained, problem.test, torch.arange(3))


def test_stages_and_settings_do_not_share_cache_entries(trained_problems, tmp_path):
    trained = trained_problems("cancer-logreg")
    execution = Execution(cache=ArtifactCache(tmp_path))
    test, removed = trained.problem.test, torch.arange(6)
    ColdResponse().compute(trained, test, removed, execution)
    first = ProximalResponse(damping=0.1).compute(trained, test, removed, execution)
    other = ProximalResponse(damping=0.2).compute(trained, test, removed, execution)
    again = ProximalResponse(damping=0.1).compute(trained, test, removed, execution)
    assert first.info["refits"] == 6 and other.info["refits"] == 6
    assert again.info["refits"] == 0 and torch.equal(again.deltas, first.deltas)
    assert not torch.allclose(first.deltas, other.deltas)


def test_resumed_and_fresh_adam_are_separate_stages(tmp_path):
    from fidelity.core.problem import MinibatchRecipe

    recipe = MinibatchRecipe(optimizer="adam", learning_rate=0.01, epochs=40, batch_size=8)
    problem = network_problem(recipe)
    execution = Execution(cache=ArtifactCache(tmp_path))
    trained = train(problem, cache=execution.cache)
    assert trained.optimizer_state.step == 40 * 4
    reloaded = train(problem, cache=execution.cache)
    assert reloaded.info["cached"]
    for name in ("first", "second"):
        torch.testing.assert_close(
            getattr(reloaded.optimizer_state, name), getattr(trained.optimizer_state, name)
        )
    removed = torch.tensor([1, 7])
    resumed = WarmResponse(epochs=2).compute(reloaded, problem.test, removed, execution)
    fresh = WarmResponse(epochs=2, optimizer="fresh").compute(
        reloaded, problem.test, removed, execution
    )
    assert fresh.info["refits"] == 3  # its own cache entries, not the resumed ones
    assert not torch.allclose(resumed.deltas, fresh.deltas)


def test_resuming_needs_an_optimizer_state():
    from dataclasses import replace

    from fidelity.core.errors import FidelityError

    problem = network_problem()
    trained = replace(train(problem), optimizer_state=None)
    with pytest.raises(FidelityError, match="no optimizer state"):
        WarmResponse(epochs=1).compute(trained, problem.test, torch.arange(2))
    WarmResponse(epochs=1, optimizer="fresh").compute(trained, problem.test, torch.arange(2))
    with pytest.raises(FidelityError, match="'resume' or 'fresh'"):
        WarmResponse(optimizer="restart")
