"""traker (TRAK's reference implementation) behind our contract: with our projection it gives
our `trak`'s scores up to its per-member scale (runs where traker is installed: the
environment of benchmarks/peers_env.sh; elsewhere the missing-library error and bad
settings)."""

import importlib.util

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.estimators import TrakEstimator
from fidelity.estimators.external.traker import TrakerEstimator
from fidelity.estimators.trak import output_function
from fidelity.retrain import train
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem

HAS_TRAKER = importlib.util.find_spec("trak") is not None
needs_traker = pytest.mark.skipif(not HAS_TRAKER, reason="traker is not installed")


@pytest.fixture(scope="module")
def mlp():
    return train(make_tiny_mlp_problem("cross_entropy", n_train=60))


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def scaled_error(theirs, ours):
    """Relative difference after the one positive scale traker's normalisation leaves."""
    scale = float((theirs * ours).sum() / (theirs * theirs).sum())
    assert scale > 0
    return float((scale * theirs - ours).norm() / ours.norm())


@pytest.mark.skipif(HAS_TRAKER, reason="traker is installed")
def test_missing_library_names_the_environment_to_create(mlp):
    with pytest.raises(FidelityError, match=r"peers_env\.sh"):
        TrakerEstimator(projection_dim=4).fit(mlp)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"projection_dim": 0}, r"traker\.projection_dim"),
        ({"ensemble_size": 0}, r"traker\.ensemble_size"),
        ({"projection": "sparse"}, r"traker\.projection"),
        ({"damping": -1.0}, r"traker\.damping"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(FidelityError, match=message):
        TrakerEstimator(**settings)


def test_a_problem_other_than_classification_is_refused():
    with pytest.raises(FidelityError, match="cross_entropy problem or a bce"):
        TrakerEstimator(projection_dim=4).check_problem(make_tiny_mlp_problem("mse"))
    TrakerEstimator(projection_dim=4).check_problem(make_tiny_mlp_problem("bce"))


@needs_traker
@pytest.mark.filterwarnings("ignore")
def test_a_one_logit_bce_model_as_two_classes_equals_our_trak_up_to_its_scale():
    trained = train(make_tiny_mlp_problem("bce", n_train=60))
    problem = trained.problem
    theirs = TrakerEstimator(projection_dim=20, damping=0.01).fit(trained)
    theirs = theirs.scores(problem.test, problem.train)
    ours = TrakEstimator(projection_dim=20, damping=0.01).fit(trained)
    ours = ours.scores(problem.test, problem.train)
    assert pearson(theirs, ours) >= 1 - 1e-9
    assert scaled_error(theirs, ours) <= 1e-5


@needs_traker
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_one_model_with_our_projection_equals_our_trak_up_to_its_scale(mlp, damping):
    problem = mlp.problem
    theirs = TrakerEstimator(projection_dim=20, damping=damping).fit(mlp)
    theirs = theirs.scores(problem.test, problem.train)
    ours = TrakEstimator(projection_dim=20, damping=damping).fit(mlp)
    ours = ours.scores(problem.test, problem.train)
    assert pearson(theirs, ours) >= 1 - 1e-9
    assert scaled_error(theirs, ours) <= 1e-5  # traker inverts in float32


@needs_traker
@pytest.mark.filterwarnings("ignore")
def test_columns_follow_the_scored_training_points(mlp):
    problem = mlp.problem
    estimator = TrakerEstimator(projection_dim=20).fit(mlp)
    full = estimator.scores(problem.test, problem.train)
    picked = torch.tensor([5, 0, 17])
    part = estimator.scores(problem.test, problem.train.subset(picked))
    torch.testing.assert_close(part, full[:, picked], rtol=1e-6, atol=0)


@needs_traker
@pytest.mark.filterwarnings("ignore")
def test_an_ensemble_weights_each_member_by_its_inverse_scale():
    # a convex problem's members share theta_s and differ in projection. traker divides each
    # member's inverse (Phi^T Phi / p + lambda)^{-1} by its mean absolute entry c_m before
    # averaging: its ensemble is sum_m ours_m / c_m, not our (TRAK's paper's) equal average
    trained = train(make_tiny_logreg(n_train=60))
    problem = trained.problem
    k, size = 6, 3
    theirs = TrakerEstimator(projection_dim=k, ensemble_size=size).fit(trained)
    theirs = theirs.scores(problem.test, problem.train)
    grads, _ = output_function(trained.model, problem, trained.theta, problem.train, 64)
    weighted, members = torch.zeros_like(theirs), []
    for member in range(size):
        single = TrakEstimator(projection_dim=k, seed=member).fit(trained)
        ours = single.scores(problem.test, problem.train)
        features = grads @ single.members_[0].projection
        inverse = torch.linalg.inv(features.T @ features / trained.n_params)
        weighted += ours / inverse.abs().mean()
        members.append(ours)
    assert scaled_error(theirs, weighted) <= 1e-5
    equal = torch.stack(members).mean(0)
    assert scaled_error(theirs, equal) > 1e-2  # measured: Pearson 0.94 with the equal average


@needs_traker
@pytest.mark.filterwarnings("ignore")
def test_its_own_projector_runs_and_tracks_ours(mlp):
    problem = mlp.problem
    theirs = TrakerEstimator(projection_dim=30, projection="traker").fit(mlp)
    scores = theirs.scores(problem.test, problem.train)
    assert scores.shape == (problem.n_test, problem.n_train)
    assert bool(torch.isfinite(scores).all())
