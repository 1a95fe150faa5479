"""The cold response: closed-form ridge leave-one-out, caching, resume, worker invariance."""

import pytest
import torch

from fidelity.core.cache import ArtifactCache
from fidelity.core.errors import FidelityError
from fidelity.retrain import ColdResponse, Execution, seeded_variant, train


def ridge_loo_deltas(problem, test_index, removed):
    """Closed-form leave-one-out change of half squared test error for ridge regression.

    J_{-j}(theta) = (1/N) sum_{i != j} 0.5 (x_i^T theta - y_i)^2 + (wd/2) ||theta||^2, so with
    A = X^T X + N wd I, theta_{-j} = theta_s - A^{-1} x_j r_j / (1 - x_j^T A^{-1} x_j) where
    r_j = y_j - x_j^T theta_s (Sherman-Morrison).
    """
    design = torch.cat([problem.x_train, torch.ones(problem.n_train, 1)], dim=1)
    targets = problem.y_train[:, 0]
    n, p = design.shape
    system = design.T @ design + n * problem.weight_decay * torch.eye(p)
    theta = torch.linalg.solve(system, design.T @ targets)
    inverse = torch.linalg.inv(system)
    test_design = torch.cat([problem.x_test, torch.ones(problem.n_test, 1)], dim=1)[test_index]
    test_targets = problem.y_test[test_index, 0]
    base = 0.5 * (test_design @ theta - test_targets) ** 2
    deltas = torch.empty(len(test_index), len(removed))
    for column, j in enumerate(removed.tolist()):
        x_j = design[j]
        residual = targets[j] - x_j @ theta
        leverage = x_j @ inverse @ x_j
        theta_j = theta + inverse @ x_j * (-residual) / (1 - leverage)
        deltas[:, column] = 0.5 * (test_design @ theta_j - test_targets) ** 2 - base
    return deltas


def test_cold_equals_closed_form_ridge_leave_one_out(trained_problems):
    trained = trained_problems("diabetes-ridge")
    problem = trained.problem
    test_index = torch.arange(0, problem.n_test, 3)
    removed = torch.arange(0, problem.n_train, 2)  # half the training set, every kind of point
    actual = ColdResponse().compute(trained, problem.test.subset(test_index), removed).deltas
    expected = ridge_loo_deltas(problem, test_index, removed)
    relative = (actual - expected).abs().max() / expected.abs().max()
    assert float(relative) <= 1e-8


def test_second_run_retrains_nothing_and_gives_identical_deltas(trained_problems, tmp_path):
    trained = trained_problems("cancer-logreg")
    test = trained.problem.test.subset(torch.arange(10))
    removed = torch.arange(0, 60, 3)
    execution = Execution(cache=ArtifactCache(tmp_path))
    first = ColdResponse(group_size=8).compute(trained, test, removed, execution)
    second = ColdResponse(group_size=8).compute(trained, test, removed, execution)
    assert first.info["refits"] == 20 and first.info["cached"] == 0
    assert second.info["refits"] == 0 and second.info["cached"] == 20
    assert torch.equal(first.deltas, second.deltas)
    assert ArtifactCache(tmp_path).count("cold") == 20


def test_interrupted_run_resumes(trained_problems, tmp_path, monkeypatch):
    import fidelity.retrain.refit as responses

    trained = trained_problems("cancer-logreg")
    test = trained.problem.test.subset(torch.arange(10))
    removed = torch.arange(40)
    execution = Execution(cache=ArtifactCache(tmp_path))
    original = responses._refit_group
    calls = {"n": 0}

    def failing_after_two_groups(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(responses, "_refit_group", failing_after_two_groups)
    with pytest.raises(KeyboardInterrupt):
        ColdResponse(group_size=10).compute(trained, test, removed, execution)
    assert ArtifactCache(tmp_path).count("cold") == 20  # the two finished groups were kept
    monkeypatch.setattr(responses, "_refit_group", original)
    resumed = ColdResponse(group_size=10).compute(trained, test, removed, execution)
    assert resumed.info == {**resumed.info, "refits": 20, "cached": 20}
    fresh = ColdResponse(group_size=10).compute(trained, test, removed)
    torch.testing.assert_close(resumed.deltas, fresh.deltas, rtol=0, atol=1e-15)


def test_cache_refuses_entries_of_another_problem(trained_problems, tmp_path):
    execution = Execution(cache=ArtifactCache(tmp_path))
    cancer = trained_problems("cancer-logreg")
    ridge = trained_problems("diabetes-ridge")
    removed = torch.arange(5)
    ColdResponse().compute(cancer, cancer.problem.test, removed, execution)
    other = ColdResponse().compute(ridge, ridge.problem.test, removed, execution)
    assert other.info["refits"] == 5 and other.info["cached"] == 0


@pytest.mark.slow
def test_results_do_not_depend_on_workers_or_group_size(trained_problems):
    trained = trained_problems("digits-logreg")
    test = trained.problem.test.subset(torch.arange(8))
    removed = torch.arange(0, 240, 10)
    one = ColdResponse(group_size=24).compute(trained, test, removed, Execution(workers=1))
    two = ColdResponse(group_size=5).compute(
        trained, test, removed, Execution(workers=2, backend="loky")
    )
    torch.testing.assert_close(one.deltas, two.deltas, rtol=0, atol=1e-14)


def test_deltas_have_design_sign(trained_problems):
    """Removing a point from its own test set raises its loss: delta[j, j] > 0."""
    trained = trained_problems("cancer-logreg")
    problem = trained.problem
    removed = torch.arange(10)
    own = problem.train.subset(removed)
    deltas = ColdResponse().compute(trained, own, removed).deltas
    assert bool((deltas.diagonal() > 0).all())


def test_removed_index_out_of_range_is_an_error(trained_problems):
    trained = trained_problems("diabetes-ridge")
    with pytest.raises(FidelityError, match=r"removed indices"):
        ColdResponse().compute(trained, trained.problem.test, torch.tensor([10_000]))


def test_seeds_on_a_convex_problem_agree_so_they_are_computed_once(trained_problems):
    """A strictly convex objective has one minimiser: another seed's model and refits give the
    same deltas, so a Newton recipe's seeds are computed once and recorded as such."""
    trained = trained_problems("cancer-logreg")
    test, removed = trained.problem.test.subset(torch.arange(8)), torch.arange(0, 40, 4)
    single = ColdResponse().compute(trained, test, removed)
    other_seed = train(seeded_variant(trained.problem, 2))
    assert other_seed.problem.recipe.init_seed == trained.problem.recipe.init_seed + 2
    again = ColdResponse().compute(other_seed, test, removed)
    torch.testing.assert_close(again.deltas, single.deltas, rtol=0, atol=1e-12)
    several = ColdResponse(seeds=3).compute(trained, test, removed)
    assert several.per_seed is None and torch.equal(several.deltas, single.deltas)
    assert several.info["seeds"] == 3 and several.info["seeds_computed"] == 1


def test_a_refit_tolerance_stops_earlier_at_that_gradient_and_is_cached_apart(
    trained_problems, tmp_path
):
    trained = trained_problems("digits-logreg")
    test = trained.problem.test.subset(torch.arange(10))
    removed = torch.arange(0, 400, 20)
    execution = Execution(cache=ArtifactCache(tmp_path))
    floor = ColdResponse().compute(trained, test, removed, execution)
    loose = ColdResponse(tolerance=1e-11).compute(trained, test, removed, execution)
    assert loose.info["cached"] == 0  # not read from the floor's entries
    assert floor.info["max_grad_norm"] < loose.info["max_grad_norm"] <= 1e-11
    assert loose.info["mean_iterations"] < floor.info["mean_iterations"]
    relative = float((loose.deltas - floor.deltas).abs().max() / floor.deltas.abs().max())
    assert 0 < relative <= 1e-7
    again = ColdResponse(tolerance=1e-11).compute(trained, test, removed, execution)
    assert again.info["cached"] == 20 and torch.equal(again.deltas, loose.deltas)


def test_a_refit_tolerance_is_for_newton_recipes(trained_problems):
    for bad in (0.0, True, float("inf")):
        with pytest.raises(FidelityError, match=r"cold\.tolerance must be a positive number"):
            ColdResponse(tolerance=bad)
    trained = trained_problems("digits-mlp")
    with pytest.raises(FidelityError, match=r"cold\.tolerance applies to Newton recipes"):
        ColdResponse(tolerance=1e-8).compute(
            trained, trained.problem.test.subset(torch.arange(2)), torch.tensor([0])
        )


def test_a_refit_tolerance_holds_for_refits_from_the_initialisation(trained_problems):
    import dataclasses

    trained = trained_problems("cancer-logreg")
    problem = trained.problem
    from_init = dataclasses.replace(
        problem, recipe=dataclasses.replace(problem.recipe, refit_start="init")
    )
    trained = dataclasses.replace(trained, problem=from_init)
    test, removed = from_init.test.subset(torch.arange(5)), torch.arange(0, 40, 8)
    floor = ColdResponse().compute(trained, test, removed)
    loose = ColdResponse(tolerance=1e-6).compute(trained, test, removed)
    assert floor.info["max_grad_norm"] < loose.info["max_grad_norm"] <= 1e-6
    assert loose.info["mean_iterations"] < floor.info["mean_iterations"]
