"""Training-path estimators against the training run itself and against closed forms: replay
against finite differences of the actual run, its limit on a converged full-batch run, SOURCE's
stationary limit and its unrolling, TracInCP's single checkpoint."""

import dataclasses
from functools import partial

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_grads, per_example_loss
from fidelity.core.problem import MinibatchRecipe, Problem
from fidelity.core.training import record_trajectory, train_minibatch
from fidelity.estimators import (
    ExactEstimator,
    GaussNewtonEstimator,
    GradDotEstimator,
    ReplayEstimator,
    SourceEstimator,
    TracInCheckpointsEstimator,
)
from fidelity.problems.models import linear_model
from fidelity.retrain import train
from fidelity.retrain.train import with_trajectory
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem

RECIPES = {
    "sgd": MinibatchRecipe(
        optimizer="sgd", learning_rate=0.1, momentum=0.9, epochs=5, batch_size=8
    ),
    "adam": MinibatchRecipe(
        optimizer="adam", learning_rate=0.01, momentum=0.9, epochs=5, batch_size=8
    ),
}


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=sorted(RECIPES))
def mlp_run(request):
    problem = dataclasses.replace(make_tiny_mlp_problem(), recipe=RECIPES[request.param])
    return train(problem)


def final_losses(trained, weights):
    problem, model = trained.problem, trained.model
    run = train_minibatch(model, problem, problem.recipe, model.initial_theta(), weights[None])
    return per_example_loss(model, problem.loss, run.thetas[0], problem.test), run.thetas[0]


def test_replay_is_the_derivative_of_the_actual_run(mlp_run):
    # a central difference of the real training run in w_j, against the reverse pass
    problem = mlp_run.problem
    estimator = ReplayEstimator(checkpoint_every=3).fit(mlp_run)
    deltas = estimator.scores(problem.test, problem.train)
    columns = torch.tensor([0, 7, 29])
    changes = estimator.parameter_changes(problem.train.subset(columns))
    step = 1e-5
    for position, j in enumerate(columns.tolist()):
        up = torch.ones(problem.n_train, dtype=torch.float64)
        down = up.clone()
        up[j] += step
        down[j] -= step
        (loss_up, theta_up), (loss_down, theta_down) = (
            final_losses(mlp_run, up),
            final_losses(mlp_run, down),
        )
        removal = -(loss_up - loss_down) / (2 * step)
        assert relative(deltas[:, j], removal) <= 1e-6
        assert relative(changes[position], -(theta_up - theta_down) / (2 * step)) <= 1e-6


def test_replay_does_not_depend_on_checkpoint_spacing(mlp_run):
    problem = mlp_run.problem
    sparse = ReplayEstimator(checkpoint_every=13).fit(mlp_run).scores(problem.test, problem.train)
    dense = ReplayEstimator(checkpoint_every=1).fit(mlp_run).scores(problem.test, problem.train)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-14)


def test_recorded_run_ends_at_theta_s_and_is_cached(mlp_run, tmp_path):
    from fidelity.core.cache import ArtifactCache

    trajectory = record_trajectory(mlp_run.model, mlp_run.problem, every=4)
    assert torch.equal(trajectory.thetas[-1], mlp_run.theta)
    assert trajectory.steps[0] == 0 and trajectory.steps[-1] == trajectory.total_steps == 20
    cache = ArtifactCache(tmp_path)
    first = with_trajectory(mlp_run, 4, cache=cache).trajectory
    again = with_trajectory(mlp_run, 4, cache=cache).trajectory
    assert first is not None and again is not None
    assert again.steps == first.steps and torch.equal(again.thetas, first.thetas)


def gradient_descent_problem(epochs):
    """tiny logistic regression trained by full-batch gradient descent (no momentum)."""
    problem = make_tiny_logreg(n_train=30)
    recipe = MinibatchRecipe(
        optimizer="sgd", learning_rate=1.0, momentum=0.0, epochs=epochs, batch_size=30
    )
    return train(dataclasses.replace(problem, recipe=recipe))


def test_replay_approaches_the_influence_function_on_a_converged_run():
    # the run's fixed point is J's optimum, where the exact influence is the derivative of the
    # optimum; the replay of a long enough run converges to it
    gaps = []
    for epochs in (20, 100, 500):
        trained = gradient_descent_problem(epochs)
        problem = trained.problem
        replay = ReplayEstimator().fit(trained).scores(problem.test, problem.train)
        exact = ExactEstimator().fit(trained).scores(problem.test, problem.train)
        gaps.append(relative(replay, exact))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-6


def test_source_with_one_stationary_segment_is_the_gauss_newton_influence():
    # SGD's dynamics (Adam's scale the curvature by its preconditioner)
    problem = dataclasses.replace(make_tiny_mlp_problem(), recipe=RECIPES["sgd"])
    mlp_run = train(problem)
    source = SourceEstimator(segments=1, horizon="stationary", damping=0.1).fit(mlp_run)
    gnh = GaussNewtonEstimator(damping=0.1).fit(mlp_run)
    torch.testing.assert_close(
        source.scores(problem.test, problem.train),
        gnh.scores(problem.test, problem.train),
        rtol=1e-10,
        atol=1e-14,
    )


def test_source_unrolling_approaches_replay_on_a_quadratic():
    # ridge regression by full-batch gradient descent: the curvature is constant, so the only
    # approximation left is each stretch's fixed training gradient, which shrinks with the
    # stretch
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]], dtype=torch.float64)
    y = y + 0.1 * torch.randn(48, 1, generator=generator, dtype=torch.float64)
    recipe = MinibatchRecipe(
        optimizer="sgd", learning_rate=0.1, momentum=0.0, epochs=40, batch_size=40
    )
    problem = Problem(
        name="quadratic",
        x_train=x[:40],
        y_train=y[:40],
        x_test=x[40:],
        y_test=y[40:],
        model_factory=partial(linear_model, 4, 1),
        loss="mse",
        weight_decay=1e-2,
        recipe=recipe,
    )
    trained = train(problem)
    replay = ReplayEstimator().fit(trained).scores(problem.test, problem.train)
    errors = [
        relative(
            SourceEstimator(segments=segments).fit(trained).scores(problem.test, problem.train),
            replay,
        )
        for segments in (1, 4, 10, 40)
    ]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.1


def test_source_with_ekfac_runs_and_reports_its_segments(mlp_run):
    problem = mlp_run.problem
    if problem.recipe.optimizer != "sgd":
        with pytest.raises(FidelityError, match="needs an SGD recipe"):
            SourceEstimator(curvature="ekfac").fit(mlp_run)
        return
    estimator = SourceEstimator(segments=2, curvature="ekfac", damping=0.1).fit(mlp_run)
    scores = estimator.scores(problem.test, problem.train)
    assert bool(torch.isfinite(scores).all())
    assert estimator.diagnostics["segment_ends"] == [10, 20]


def test_tracin_with_one_checkpoint_is_grad_dot(mlp_run):
    problem = mlp_run.problem
    tracin = TracInCheckpointsEstimator(checkpoints=1).fit(mlp_run)
    grad_dot = GradDotEstimator().fit(mlp_run)
    torch.testing.assert_close(
        tracin.scores(problem.test, problem.train),
        grad_dot.scores(problem.test, problem.train),
        rtol=1e-12,
        atol=1e-15,
    )
    several = TracInCheckpointsEstimator(checkpoints=4).fit(mlp_run)
    assert several.diagnostics["checkpoint_steps"] == [5, 10, 15, 20]


def test_training_path_estimators_refuse_what_they_cannot_run():
    newton = train(make_tiny_logreg())
    for estimator in (ReplayEstimator(), SourceEstimator(), TracInCheckpointsEstimator()):
        with pytest.raises(FidelityError, match="trained by full-batch Newton"):
            estimator.fit(newton)
    short = dataclasses.replace(make_tiny_mlp_problem(), recipe=RECIPES["sgd"])  # 20 steps
    with pytest.raises(FidelityError, match=r"source\.segments is 21, but the run"):
        SourceEstimator(segments=21).check_problem(short)
    with pytest.raises(FidelityError, match=r"tracin-cp\.checkpoints is 50"):
        TracInCheckpointsEstimator(checkpoints=50).check_problem(short)
    with pytest.raises(FidelityError, match="not training points"):
        ReplayEstimator().fit(train(short)).scores(short.test, short.test)
    with pytest.raises(FidelityError, match=r"source\.horizon"):
        SourceEstimator(horizon="forever")


@pytest.mark.parametrize("curvature", ["gnh", "ekfac"])
def test_source_scores_are_the_measurement_of_its_parameter_changes(curvature):
    # the adjoint form (scores) and the forward form (parameter_changes) of one linear map
    problem = dataclasses.replace(make_tiny_mlp_problem(), recipe=RECIPES["sgd"])
    trained = train(problem)
    estimator = SourceEstimator(segments=3, curvature=curvature).fit(trained)
    changes = estimator.parameter_changes(problem.train)
    test_grads = per_example_grads(trained.model, problem.loss, trained.theta, problem.test)
    torch.testing.assert_close(
        estimator.scores(problem.test, problem.train),
        test_grads @ changes.T,
        rtol=1e-9,
        atol=1e-13,
    )
