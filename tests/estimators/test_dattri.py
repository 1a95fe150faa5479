"""dattri behind our contract: after conversion its explicit, CG, LiSSA and Arnoldi solvers equal
our dense `exact`, DataInf equals the closed form it implements, and its EK-FAC deviates from ours
by two measured defects (runs where dattri is installed: the environment of
benchmarks/peers_env.sh; elsewhere only the missing-library error and bad settings)."""

import importlib.util

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_grads
from fidelity.estimators import ESTIMATORS, ExactEstimator
from fidelity.estimators.external.dattri import DattriEstimator
from fidelity.estimators.kfac import select_layers
from fidelity.retrain import train
from tests.conftest import make_tiny_mlp_problem
from tests.estimators.references import relative_error

HAS_DATTRI = importlib.util.find_spec("dattri") is not None
needs_dattri = pytest.mark.skipif(not HAS_DATTRI, reason="dattri is not installed")
DAMPING = 0.1


@pytest.fixture(scope="module")
def mlp():
    return train(make_tiny_mlp_problem("cross_entropy"))


@pytest.fixture(scope="module")
def exact(mlp):
    problem = mlp.problem
    return ExactEstimator(damping=DAMPING).fit(mlp).scores(problem.test, problem.train)


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def dattri_scores(mlp, **settings):
    problem = mlp.problem
    estimator = DattriEstimator(damping=DAMPING, **settings).fit(mlp)
    return estimator, estimator.scores(problem.test, problem.train)


@pytest.mark.skipif(HAS_DATTRI, reason="dattri is installed")
def test_missing_library_names_the_environment_to_create(mlp):
    with pytest.raises(FidelityError, match=r"peers_env\.sh"):
        DattriEstimator().fit(mlp)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"solver": "influence"}, r"dattri\.solver"),
        ({"damping": -1.0}, r"dattri\.damping"),
        ({"scale": 0.0}, r"dattri\.scale"),
        ({"iterations": 0}, r"dattri\.iterations"),
        ({"minibatch_size": 0}, r"dattri\.minibatch_size"),
        ({"solver": "cg", "layers": "0"}, r"dattri\.layers"),
        ({"solver": "logra", "projection_dim": 60}, "perfect square"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(FidelityError, match=message):
        DattriEstimator(**settings)


@needs_dattri
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("solver", "options"),
    [("explicit", {}), ("cg", {"iterations": 38})],  # CG: p steps (dattri ignores tol)
)
def test_explicit_and_cg_equal_exact_after_conversion(mlp, exact, solver, options):
    assert mlp.n_params == 38
    estimator, actual = dattri_scores(mlp, solver=solver, **options)
    assert actual.shape == exact.shape == (mlp.problem.n_test, mlp.problem.n_train)
    assert relative_error(actual, exact) <= 1e-6
    columns = torch.tensor([7, 2, 19])
    subset = estimator.scores(mlp.problem.test, mlp.problem.train.subset(columns))
    torch.testing.assert_close(subset, actual[:, columns], rtol=1e-12, atol=0)


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_full_batch_lissa_converges_to_exact(mlp, exact):
    """Full-batch LiSSA with scale 1 (> half the largest eigenvalue of H + 0.11 I, 1.43) and
    200 steps: the recursion contracts by at most 0.89 a step."""
    _, actual = dattri_scores(mlp, solver="lissa", depth=200, scale=1.0)
    assert relative_error(actual, exact) <= 1e-6


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_arnoldi_at_the_krylov_dimension_equals_exact(mlp, exact):
    """H + 0.11 I of this MLP has 33 distinct eigenvalues (a 6-fold 0.11 from the softmax's
    shift invariance, which the gradients do not see): 33 Ritz pairs are the exact solve."""
    estimator, actual = dattri_scores(mlp, solver="arnoldi", rank=33, iterations=39)
    assert estimator.diagnostics["nonfinite_scores"] == 0
    assert relative_error(actual, exact) <= 1e-6


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_arnoldi_at_full_rank_gives_unusable_scores(mlp, exact):
    """dattri defect, measured: past the Krylov dimension its basis (no re-orthogonalisation)
    yields a spurious Ritz value of about 0; its guard warns and lowers proj_dim to the positive
    values but keeps the spurious one, and 1/sqrt of it ruins every score. Its sign is rounding:
    -3e-17 on one machine made every score NaN (240 non-finite), a tiny positive value on another
    made them about 1e15 (the exact scores are below 1)."""
    estimator, actual = dattri_scores(mlp, solver="arnoldi", rank=38, iterations=39)
    assert any("negative eigenvalues" in m for m in estimator.diagnostics["library_warnings"])
    nonfinite = estimator.diagnostics["nonfinite_scores"]
    assert nonfinite == int((~torch.isfinite(actual)).sum())
    if nonfinite:
        assert nonfinite == actual.numel() == 240
    else:
        assert float(actual.abs().min()) > 1e6 * float(exact.abs().max())


def layer_indices(mlp):
    blocks, uncovered = select_layers(mlp.model, None)
    assert not uncovered
    return blocks, [
        torch.cat(
            [torch.arange(b.weight.start, b.weight.stop), torch.arange(b.bias.start, b.bias.stop)]
        )
        for b in blocks
    ]


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_datainf_equals_its_per_layer_closed_form(mlp, exact):
    """DataInf replaces each layer's (G_l + r I)^{-1} v by (1/N) sum_i (g_il g_il^T + r I)^{-1} v
    (r = wd + damping); against the exact solve it is an approximation (Pearson 0.845 here)."""
    problem = mlp.problem
    _, actual = dattri_scores(mlp, solver="datainf")
    g_train = per_example_grads(mlp.model, problem.loss, mlp.theta, problem.train)
    g_test = per_example_grads(mlp.model, problem.loss, mlp.theta, problem.test)
    r = problem.weight_decay + DAMPING
    transformed = torch.zeros_like(g_test)
    for index in layer_indices(mlp)[1]:
        v, g = g_test[:, index], g_train[:, index]
        coefficients = (v @ g.T) / (r + g.pow(2).sum(1))  # [n_test, N]
        transformed[:, index] = (v - coefficients @ g / problem.n_train) / r
    expected = transformed @ g_train.T / problem.n_train
    assert relative_error(actual, expected) <= 1e-10
    assert pearson(actual, exact) == pytest.approx(0.8451, abs=1e-3)


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_datainf_equals_our_datainf_at_the_same_damping(mlp):
    """dattri's DataInf with r = wd + damping is our `datainf` with that absolute damping on
    every layer (ours groups a module's weight and bias as one layer, as dattri does)."""
    from fidelity.estimators import DataInfEstimator

    problem = mlp.problem
    _, theirs = dattri_scores(mlp, solver="datainf")
    ours = (
        DataInfEstimator(damping=problem.weight_decay + DAMPING)
        .fit(mlp)
        .scores(problem.test, problem.train)
    )
    assert relative_error(theirs, ours) <= 1e-10


def ekfac_closed_form(mlp, bases, damping, *, dattri_defects):
    """EK-FAC scores from the Kronecker eigenbases ``bases`` (layer name -> (Q_A, Q_S), as
    torch.linalg.eigh returns them), the eigenvalues corrected to the per-example gradients'
    second moments in the rotated basis; with ``dattri_defects``, rotated as dattri 0.3.0 does
    (Q_S G Q_A^T) and with its layout of a bias gradient (reshape(cat(W.flatten(), b)))."""
    problem = mlp.problem
    g_train = per_example_grads(mlp.model, problem.loss, mlp.theta, problem.train)
    g_test = per_example_grads(mlp.model, problem.loss, mlp.theta, problem.test)
    blocks, indices = layer_indices(mlp)
    transformed = torch.zeros_like(g_test)
    for block, index in zip(blocks, indices, strict=True):
        q_a, q_s = bases[block.name]
        if dattri_defects:
            q_s, q_a = q_s.T, q_a.T  # rows of eigh's Q as the basis: Q_S G Q_A^T
            test_matrices = g_test[:, index].reshape(-1, block.out_features, block.columns)
        else:
            test_matrices = block.matrices(g_test)

        def rotate(m, q_s=q_s, q_a=q_a):
            return q_s.T @ m @ q_a

        def back(m, q_s=q_s, q_a=q_a):
            return q_s @ m @ q_a.T

        eigenvalues = rotate(block.matrices(g_train)).pow(2).mean(0)
        solved = back(rotate(test_matrices) / (eigenvalues + damping))
        if dattri_defects:
            transformed[:, index] = solved.reshape(len(g_test), -1)
        else:
            block.scatter(solved, transformed)
    return transformed @ g_train.T / problem.n_train


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_ekfac_deviates_from_ours_by_two_measured_defects(mlp):
    """Same Fisher (empirical), layers (every nn.Linear) and damping (wd + damping): dattri's
    EK-FAC is not ours. It equals, to rounding, the EK-FAC closed form built on its own factors
    with its two defects (rotation by the rows of eigh's eigenvector matrices; bias gradient laid
    out as reshape(cat(W.flatten(), b), [out, in + 1])); the same closed form without them
    equals our `ekfac`. Measured: max relative difference 0.78, Pearson 0.959."""
    problem = mlp.problem
    ours = (
        ESTIMATORS.get("ekfac")(fisher="empirical", damping=DAMPING)
        .fit(mlp)
        .scores(problem.test, problem.train)
    )
    estimator, theirs = dattri_scores(mlp, solver="ekfac")
    attributor = estimator.attributor_
    bases = attributor.cached_q
    shift = problem.weight_decay + DAMPING
    assert relative_error(theirs, ours) == pytest.approx(0.7808, abs=1e-3)
    assert pearson(theirs, ours) == pytest.approx(0.9594, abs=1e-3)
    with_defects = ekfac_closed_form(mlp, bases, shift, dattri_defects=True)
    assert relative_error(theirs, with_defects) <= 1e-10
    without_defects = ekfac_closed_form(mlp, bases, shift, dattri_defects=False)
    assert relative_error(without_defects, ours) <= 1e-10


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_runs_in_the_problem_dtype_and_restores_the_default(mlp, exact):
    """dattri allocates in torch's default dtype; the adapter sets it to the problem's (float64)
    for the call and restores the caller's."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        _, actual = dattri_scores(mlp, solver="explicit")
        assert torch.get_default_dtype() == torch.float32
    finally:
        torch.set_default_dtype(previous)
    assert actual.dtype == torch.float64
    assert relative_error(actual, exact) <= 1e-12


@needs_dattri
def test_a_model_that_is_one_layer_equals_exact(trained_problems):
    """digits-logreg's model is a bare nn.Linear, in which dattri found no parameters
    (StopIteration in its get_param); the adapter gives it a parent."""
    trained = trained_problems("digits-logreg")
    problem = trained.problem
    test = problem.test.subset(torch.arange(5))
    train_points = problem.train.subset(torch.arange(40))
    expected = ExactEstimator(damping=0.0).fit(trained).scores(test, train_points)
    actual = DattriEstimator(solver="explicit").fit(trained).scores(test, train_points)
    assert relative_error(actual, expected) <= 1e-6


@needs_dattri
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("damping", [0.01, 0.1])
def test_trak_with_its_identity_projection_equals_our_unprojected_trak(mlp, damping):
    """dattri's TRAK (gradients / sqrt(p), regularization r = damping N, no projection) is our
    `trak` with an orthogonal projection that keeps every dimension, at the same damping."""
    from fidelity.estimators import TrakEstimator

    problem = mlp.problem
    theirs = DattriEstimator(solver="trak", damping=damping).fit(mlp)
    theirs = theirs.scores(problem.test, problem.train)
    ours = TrakEstimator(projection_dim=mlp.n_params, projection="orthogonal", damping=damping)
    ours = ours.fit(mlp).scores(problem.test, problem.train)
    assert relative_error(theirs, ours) <= 1e-8


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_trak_scores_a_subset_of_its_training_set(mlp):
    problem = mlp.problem
    estimator = DattriEstimator(solver="trak", damping=0.01, projection_dim=10).fit(mlp)
    full = estimator.scores(problem.test, problem.train)
    picked = torch.tensor([3, 0, 11])
    part = estimator.scores(problem.test, problem.train.subset(picked))
    torch.testing.assert_close(part, full[:, picked], rtol=1e-10, atol=0)


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_tracin_at_theta_s_equals_grad_dot(mlp):
    problem = mlp.problem
    theirs = DattriEstimator(solver="tracin").fit(mlp).scores(problem.test, problem.train)
    ours = ESTIMATORS.get("grad-dot")().fit(mlp).scores(problem.test, problem.train)
    assert relative_error(theirs, ours) <= 1e-10


def test_projection_dim_is_for_trak_and_logra_only():
    with pytest.raises(FidelityError, match=r"dattri\.projection_dim applies"):
        DattriEstimator(solver="cg", projection_dim=4)


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_per_example_solvers_run_on_a_network_that_reshapes_its_input():
    # dattri hands its loss one unbatched example; a CNN reshapes x into a batch of its own
    from fidelity.estimators import DataInfEstimator
    from tests.conftest import make_tiny_cnn_problem

    cnn = train(make_tiny_cnn_problem())
    problem = cnn.problem
    tracin = DattriEstimator(solver="tracin").fit(cnn).scores(problem.test, problem.train)
    grad_dot = ESTIMATORS.get("grad-dot")().fit(cnn).scores(problem.test, problem.train)
    assert relative_error(tracin, grad_dot) <= 1e-10
    datainf = DattriEstimator(solver="datainf", damping=DAMPING).fit(cnn)
    ours = DataInfEstimator(damping=problem.weight_decay + DAMPING).fit(cnn)
    assert (
        relative_error(
            datainf.scores(problem.test, problem.train), ours.scores(problem.test, problem.train)
        )
        <= 1e-10
    )


def block_diagonal_efisher_influence(trained, relative_damping, layers=None):
    """Dense float64 reference of dattri's LoGra without projection: per nn.Linear layer, the
    empirical Fisher of its weight and bias, F_l, damped by relative_damping x its mean
    eigenvalue; delta = (1/N) sum_l g_tl^T (F_l + d_l I)^{-1} g_jl."""
    problem = trained.problem
    blocks, _ = select_layers(trained.model, layers)
    g_train = per_example_grads(trained.model, problem.loss, trained.theta, problem.train, 512)
    g_test = per_example_grads(trained.model, problem.loss, trained.theta, problem.test, 512)
    total = torch.zeros(problem.n_test, problem.n_train)
    for block in blocks:
        pieces = [torch.arange(block.weight.start, block.weight.stop)]
        if block.bias is not None:
            pieces.append(torch.arange(block.bias.start, block.bias.stop))
        columns = torch.cat(pieces)
        train_part, test_part = g_train[:, columns], g_test[:, columns]
        fisher = train_part.T @ train_part / problem.n_train
        shift = relative_damping * torch.trace(fisher) / fisher.shape[0]
        fisher += shift * torch.eye(fisher.shape[0])
        total += test_part @ torch.linalg.solve(fisher, train_part.T)
    return total / problem.n_train


@needs_dattri
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_logra_without_projection_is_the_damped_per_layer_empirical_fisher(loss):
    trained = train(make_tiny_mlp_problem(loss, n_train=60))
    problem = trained.problem
    estimator = DattriEstimator(solver="logra", damping=0.05, batch_size=7).fit(trained)
    theirs = estimator.scores(problem.test, problem.train)
    reference = block_diagonal_efisher_influence(trained, 0.05)
    assert relative_error(theirs, reference) <= 1e-5  # dattri's Fisher is float32
    picked = torch.tensor([7, 0, 31])
    part = estimator.scores(problem.test, problem.train.subset(picked))
    torch.testing.assert_close(part, theirs[:, picked], rtol=1e-6, atol=1e-12)
    one_layer = DattriEstimator(solver="logra", damping=0.05, layers="*0").fit(trained)
    assert (
        relative_error(
            one_layer.scores(problem.test, problem.train),
            block_diagonal_efisher_influence(trained, 0.05, layers="*0"),
        )
        <= 1e-5
    )


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_logra_with_its_projection_tracks_the_unprojected_one():
    mlp = train(make_tiny_mlp_problem("cross_entropy", n_train=60))
    problem = mlp.problem
    full = DattriEstimator(solver="logra", damping=0.05).fit(mlp)
    projected = DattriEstimator(solver="logra", damping=0.05, projection_dim=16).fit(mlp)
    full_scores = full.scores(problem.test, problem.train)
    projected_scores = projected.scores(problem.test, problem.train)
    assert torch.isfinite(projected_scores).all()
    assert pearson(projected_scores, full_scores) > 0.5


@needs_dattri
@pytest.mark.filterwarnings("ignore")
def test_logra_fits_of_two_training_sets_in_one_directory_do_not_mix(tmp_path, monkeypatch):
    # dattri reuses a batch-metadata file it finds in its cache_dir (default: the working
    # directory); each fit of the adapter has its own
    monkeypatch.chdir(tmp_path)
    for n_train in (60, 40):
        trained = train(make_tiny_mlp_problem("cross_entropy", n_train=n_train))
        problem = trained.problem
        theirs = DattriEstimator(solver="logra", damping=0.05).fit(trained)
        reference = block_diagonal_efisher_influence(trained, 0.05)
        assert relative_error(theirs.scores(problem.test, problem.train), reference) <= 1e-5
    assert list(tmp_path.iterdir()) == []
