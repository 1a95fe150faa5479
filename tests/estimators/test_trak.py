"""TRAK against the Gauss-Newton influence of its output function, its ensembles, and its
refusals."""

import dataclasses

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.objective import target_values
from fidelity.core.problem import MinibatchRecipe, seeded_variant
from fidelity.estimators import TrakEstimator
from fidelity.estimators.trak import output_function, random_projection
from fidelity.retrain import train
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem


def relative(a, b):
    return float((a - b).norm() / b.norm())


def output_function_influence(trained, damping):
    """(1/N) g_t^T (G_f + damping I)^{-1} g_j, dense in float64: G_f = (1/N) sum grad f grad f^T
    over the training set, g = (dL/df) grad f, f the margin (classification) or the output."""
    problem = trained.problem
    model, theta = trained.model, trained.theta

    def scalar_output(point, x, y):
        one = x.unsqueeze(0)
        if problem.loss == "mse":
            return model(point, one)[0, 0]
        return target_values(
            model, problem.loss, point, type(problem.train)(one, y[None]), "margin"
        )[0]

    def grads_and_derivatives(data):
        grads = torch.stack(
            [
                torch.func.grad(scalar_output)(theta, x, y)
                for x, y in zip(data.x, data.y, strict=True)
            ]
        )
        values = torch.stack(
            [scalar_output(theta, x, y) for x, y in zip(data.x, data.y, strict=True)]
        )
        # mse: dL/df = f - y; classification: loss = softplus(-margin)
        mse = problem.loss == "mse"
        derivative = values - data.y[:, 0] if mse else -torch.sigmoid(-values)
        return grads, derivative

    train_grads, train_derivative = grads_and_derivatives(problem.train)
    test_grads, test_derivative = grads_and_derivatives(problem.test)
    n = problem.n_train
    curvature = train_grads.T @ train_grads / n + damping * torch.eye(trained.n_params)
    test_loss_grads = test_derivative[:, None] * test_grads
    train_loss_grads = train_derivative[:, None] * train_grads
    return test_loss_grads @ torch.linalg.solve(curvature, train_loss_grads.T) / n


def linear_variant(problem):
    from fidelity.problems.models import linear_model

    outputs = 1 if problem.loss != "cross_entropy" else 3
    return dataclasses.replace(
        problem, model_factory=lambda: linear_model(3, outputs), name=f"tiny-linear-{problem.loss}"
    )


PROBLEMS = {
    "logreg": make_tiny_logreg(),
    "linear-bce": linear_variant(make_tiny_mlp_problem(loss="bce")),
    "ridge": linear_variant(make_tiny_mlp_problem(loss="mse")),
    "mlp-bce": make_tiny_mlp_problem(loss="bce"),
    "mlp-mse": make_tiny_mlp_problem(loss="mse"),
    "mlp-ce": make_tiny_mlp_problem(loss="cross_entropy"),
}


# Undamped only where G_f is regular: the multiclass margin is unchanged when every logit
# shifts, and the small tanh networks have switched-off units (zero gradients) at their optimum.
@pytest.mark.parametrize(
    "name, damping",
    [("linear-bce", 0.0), ("ridge", 0.0)] + [(name, 0.01) for name in PROBLEMS],
)
def test_full_orthogonal_projection_is_the_gauss_newton_influence_of_the_output_function(
    name, damping
):
    problem = PROBLEMS[name]
    trained = train(problem)
    trak = TrakEstimator(
        projection_dim=trained.n_params, projection="orthogonal", damping=damping
    ).fit(trained)
    scores = trak.scores(problem.test, problem.train)
    assert relative(scores, output_function_influence(trained, damping)) <= 1e-9


def test_the_loss_gradient_is_the_output_derivative_times_the_output_gradient():
    # the identity TRAK's Q rests on: grad L = (dL/df) grad f, for the margin and cross-entropy
    trained = train(make_tiny_logreg())
    problem = trained.problem
    grads, derivative = output_function(trained.model, problem, trained.theta, problem.train, 7)
    from fidelity.core.objective import per_example_grads

    loss_grads = per_example_grads(trained.model, problem.loss, trained.theta, problem.train)
    assert relative(derivative[:, None] * grads, loss_grads) <= 1e-12


def test_without_damping_any_invertible_square_projection_gives_the_same_scores():
    trained = train(PROBLEMS["linear-bce"])
    problem, p = trained.problem, trained.n_params
    like = trained.theta
    # a small square sign matrix is often singular: take the first seed whose matrix is not
    seed = next(
        seed
        for seed in range(100)
        if torch.linalg.matrix_rank(random_projection(p, p, "rademacher", seed, like=like)) == p
    )
    scores = {
        kind: TrakEstimator(projection_dim=p, projection=kind, seed=seed)
        .fit(trained)
        .scores(problem.test, problem.train)
        for kind in ("gaussian", "rademacher", "orthogonal")
    }
    assert relative(scores["gaussian"], scores["orthogonal"]) <= 1e-8
    assert relative(scores["rademacher"], scores["orthogonal"]) <= 1e-8


def test_projections_have_the_documented_scale():
    like = torch.zeros(1, dtype=torch.float64)
    square = random_projection(12, 12, "orthogonal", 0, like=like)
    assert torch.allclose(square @ square.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    for kind in ("gaussian", "rademacher"):
        matrix = random_projection(40, 4000, kind, 0, like=like)
        # E[P P^T] = I: the diagonal concentrates at 1
        assert (matrix @ matrix.T).diagonal().sub(1).abs().max() < 0.1
    again = random_projection(40, 30, "gaussian", 5, like=like)
    assert torch.equal(again, random_projection(40, 30, "gaussian", 5, like=like))
    assert not torch.equal(again, random_projection(40, 30, "gaussian", 6, like=like))


def test_a_newton_ensemble_averages_its_members_projections():
    # a convex problem's members share theta_s, so a_t and a_j are common and the ensemble is
    # the mean of single-member estimators with seeds seed, seed + 1, ...
    trained = train(make_tiny_logreg())
    problem = trained.problem
    ensemble = TrakEstimator(projection_dim=5, ensemble_size=3, seed=2).fit(trained)
    members = [
        TrakEstimator(projection_dim=5, seed=seed).fit(trained).scores(problem.test, problem.train)
        for seed in (2, 3, 4)
    ]
    expected = torch.stack(members).mean(0)
    assert relative(ensemble.scores(problem.test, problem.train), expected) <= 1e-12


def tiny_minibatch_problem():
    problem = make_tiny_mlp_problem(loss="cross_entropy", n_train=24)
    recipe = MinibatchRecipe(
        optimizer="sgd", learning_rate=0.1, momentum=0.9, epochs=4, batch_size=8
    )
    return dataclasses.replace(problem, recipe=recipe, name="tiny-mlp-minibatch")


def test_seed_members_are_the_models_trained_from_shifted_seeds_and_average_as_documented():
    trained = train(tiny_minibatch_problem())
    problem = trained.problem
    trak = TrakEstimator(projection_dim=6, ensemble_size=3).fit(trained)
    assert torch.equal(trak.members_[0].theta, trained.theta)
    for offset in (1, 2):
        other = train(seeded_variant(problem, offset)).theta
        assert torch.allclose(trak.members_[offset].theta, other, rtol=0, atol=1e-12)
    # TRAK's combination: the mean kernel times the mean output derivatives of both sides
    kernels, test_sides, train_sides = [], [], []
    for member in trak.members_:
        test_grads, test_side = output_function(
            trained.model, problem, member.theta, problem.test, 64
        )
        train_grads, train_side = output_function(
            trained.model, problem, member.theta, problem.train, 64
        )
        test_features = test_grads @ member.projection
        train_features = train_grads @ member.projection
        curvature = train_features.T @ train_features / problem.n_train
        kernels.append(test_features @ torch.linalg.solve(curvature, train_features.T))
        test_sides.append(test_side)
        train_sides.append(train_side)
    expected = (
        torch.stack(test_sides).mean(0)[:, None]
        * torch.stack(kernels).mean(0)
        * torch.stack(train_sides).mean(0)[None, :]
        / problem.n_train
    )
    assert relative(trak.scores(problem.test, problem.train), expected) <= 1e-9


def test_checkpoint_members_end_at_theta_s():
    trained = train(tiny_minibatch_problem())
    trak = TrakEstimator(projection_dim=6, ensemble_size=2, ensemble="checkpoints").fit(trained)
    assert torch.allclose(trak.members_[0].theta, trained.theta, rtol=0, atol=1e-12)
    assert not torch.allclose(trak.members_[1].theta, trained.theta)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"projection_dim": 0}, "projection_dim must be"),
        ({"ensemble_size": 0}, "ensemble_size must be"),
        ({"projection": "sparse"}, "trak.projection must be one of"),
        ({"ensemble": "bagging"}, "trak.ensemble must be one of"),
        ({"damping": -1.0}, "trak.damping"),
    ],
)
def test_bad_settings_are_refused_at_construction(settings, message):
    with pytest.raises(FidelityError, match=message):
        TrakEstimator(**settings)


def test_bad_settings_for_the_problem_are_refused_before_compute():
    problem = make_tiny_logreg()
    with pytest.raises(FidelityError, match="at most as many dimensions as parameters"):
        TrakEstimator(projection_dim=13).check_problem(problem)
    with pytest.raises(FidelityError, match="minibatch"):
        TrakEstimator(ensemble="checkpoints", projection_dim=4).check_problem(problem)
    wide = make_tiny_mlp_problem(loss="mse")
    wide = dataclasses.replace(
        wide, y_train=wide.y_train.repeat(1, 2), y_test=wide.y_test.repeat(1, 2)
    )
    with pytest.raises(FidelityError, match="scalar output function"):
        TrakEstimator(projection_dim=4).check_problem(wide)


def test_a_singular_projected_curvature_names_the_fix():
    # multiclass margins do not move when every logit shifts: a full projection is singular
    trained = train(make_tiny_logreg())
    with pytest.raises(FidelityError, match="set damping > 0"):
        TrakEstimator(projection_dim=trained.n_params).fit(trained)
