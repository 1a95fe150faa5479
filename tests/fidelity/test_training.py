"""Minibatch training: recorded order, vmapped = sequential, pairing with theta_s."""

import pytest
import torch

from fidelity.core.cache import ArtifactCache
from fidelity.core.objective import objective_hessian
from fidelity.core.problem import FunctionalModel, MinibatchRecipe
from fidelity.core.training import batch_order, train_minibatch
from fidelity.retrain import ColdResponse, Execution, train
from fidelity.retrain.newton import newton_minimize, refit_removals, removal_weights
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem

RECIPE = MinibatchRecipe(optimizer="sgd", learning_rate=0.1, epochs=20, batch_size=8)


def network_problem(recipe=RECIPE):
    problem = make_tiny_mlp_problem("cross_entropy", n_train=30)
    return type(problem)(**{**vars(problem), "recipe": recipe})


def test_batch_order_is_a_seeded_permutation_per_epoch():
    order = batch_order(RECIPE, 30)
    assert order.shape == (20, 30)
    assert all(sorted(row.tolist()) == list(range(30)) for row in order)
    assert torch.equal(order, batch_order(RECIPE, 30))
    other = MinibatchRecipe(**{**vars(RECIPE), "order_seed": 1})
    assert not torch.equal(order, batch_order(other, 30))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_vmapped_training_equals_one_model_at_a_time(optimizer):
    recipe = MinibatchRecipe(**{**vars(RECIPE), "optimizer": optimizer, "learning_rate": 0.02})
    problem = network_problem(recipe)
    model = FunctionalModel.of(problem.build_model())
    theta0 = model.initial_theta()
    weights = removal_weights(problem.n_train, torch.tensor([0, 11, 29]), theta0)
    together = train_minibatch(model, problem, recipe, theta0, weights).thetas
    for b in range(3):
        alone = train_minibatch(model, problem, recipe, theta0, weights[b : b + 1]).thetas[0]
        torch.testing.assert_close(together[b], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resuming_the_optimizer_state_continues_the_run(optimizer):
    """Full batches make the order irrelevant: 3 + 3 resumed epochs are the 6-epoch run."""
    problem = network_problem()
    recipe = MinibatchRecipe(
        optimizer=optimizer, learning_rate=0.02, epochs=6, batch_size=problem.n_train
    )
    model = FunctionalModel.of(problem.build_model())
    weights = removal_weights(problem.n_train, torch.tensor([3]), model.initial_theta())
    whole = train_minibatch(model, problem, recipe, model.initial_theta(), weights)
    half = train_minibatch(model, problem, recipe, model.initial_theta(), weights, epochs=3)
    assert half.state.step == 3 and whole.state.step == 6
    rest = train_minibatch(
        model, problem, recipe, half.thetas[0], weights, epochs=3, state=half.state
    )
    restarted = train_minibatch(model, problem, recipe, half.thetas[0], weights, epochs=3)
    torch.testing.assert_close(rest.thetas, whole.thetas, rtol=0, atol=1e-12)
    torch.testing.assert_close(rest.state.first, whole.state.first, rtol=0, atol=1e-12)
    torch.testing.assert_close(rest.state.second, whole.state.second, rtol=0, atol=1e-12)
    assert float((restarted.thetas - whole.thetas).abs().max()) > 1e-6


def test_full_batch_descent_reaches_the_exact_weighted_minimiser():
    """With |B| = N the step follows grad J_{-j} exactly (same 1/N): compare with Newton."""
    problem = make_tiny_logreg()
    recipe = MinibatchRecipe(
        optimizer="sgd", learning_rate=0.5, momentum=0.9, epochs=3000, batch_size=problem.n_train
    )
    model = FunctionalModel.of(problem.build_model())
    theta_s = newton_minimize(model, problem, model.initial_theta()).theta
    inverse = torch.linalg.inv(objective_hessian(model, problem, theta_s))
    removed = torch.tensor([4, 17])
    exact = refit_removals(model, problem, theta_s, inverse, removed).thetas
    weights = removal_weights(problem.n_train, removed, theta_s)
    descended = train_minibatch(model, problem, recipe, model.initial_theta(), weights).thetas
    torch.testing.assert_close(descended, exact, rtol=0, atol=1e-9)


def test_cold_on_a_network_is_paired_with_theta_s(tmp_path):
    problem = network_problem()
    trained = train(problem)
    assert trained.info["iterations"] == RECIPE.epochs and trained.info["grad_norm"] > 0
    model = trained.model
    ones = torch.ones(1, problem.n_train)
    again = train_minibatch(model, problem, RECIPE, model.initial_theta(), ones).thetas[0]
    torch.testing.assert_close(again, trained.theta, rtol=0, atol=1e-12)
    removed = torch.arange(0, 30, 3)
    execution = Execution(cache=ArtifactCache(tmp_path))
    first = ColdResponse(group_size=4).compute(trained, problem.test, removed, execution)
    second = ColdResponse(group_size=10).compute(trained, problem.test, removed, execution)
    assert first.deltas.shape == (problem.n_test, 10)
    assert second.info["refits"] == 0 and torch.equal(first.deltas, second.deltas)
    fresh = ColdResponse(group_size=7).compute(trained, problem.test, removed)
    torch.testing.assert_close(fresh.deltas, first.deltas, rtol=0, atol=1e-12)
    assert float(first.deltas.abs().max()) > 1e-6


def test_cold_with_seeds_pairs_each_seed_with_its_own_full_model(tmp_path):
    from fidelity.retrain import seeded_variant

    problem = network_problem()
    trained = train(problem)
    removed = torch.tensor([1, 8, 20])
    execution = Execution(cache=ArtifactCache(tmp_path))
    single = ColdResponse().compute(trained, problem.test, removed, execution)
    several = ColdResponse(seeds=3).compute(trained, problem.test, removed, execution)
    assert several.per_seed.shape == (3, problem.n_test, 3)
    torch.testing.assert_close(several.per_seed[0], single.deltas, rtol=0, atol=0)
    torch.testing.assert_close(several.deltas, several.per_seed.mean(0), rtol=0, atol=1e-15)
    assert not torch.allclose(several.per_seed[1], several.per_seed[2])
    shifted = seeded_variant(problem, 2)
    assert (shifted.recipe.init_seed, shifted.recipe.order_seed) == (2, 2)
    seed_two = ColdResponse().compute(train(shifted), problem.test, removed)
    torch.testing.assert_close(several.per_seed[2], seed_two.deltas, rtol=0, atol=1e-12)
    again = ColdResponse(seeds=3).compute(trained, problem.test, removed, execution)
    assert again.info["refits"] == 0 and torch.equal(again.per_seed, several.per_seed)


def test_initial_theta_survives_a_copy_taken_during_a_functional_call():
    # functional_call swaps the evaluated parameters into the module for the length of a call;
    # a copy of the model taken then (as dask took one between workers) must still start
    # retrains from the initialisation, not from the parameters being evaluated.
    import copy

    from torch import nn

    from fidelity.core.problem import FunctionalModel

    copies = []

    class Copying(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 2)

        def forward(self, x):
            copies.append(copy.deepcopy(model))
            return self.layer(x)

    model = FunctionalModel.of(Copying())
    initial = model.initial_theta()
    evaluated = initial + 1.0
    model(evaluated, torch.zeros(1, 3))
    (taken,) = copies
    assert torch.equal(taken.spec.flatten(dict(taken.module.named_parameters())), evaluated)
    assert torch.equal(taken.initial_theta(), initial)
    assert torch.equal(model.initial_theta(), initial)
