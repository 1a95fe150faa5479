"""The five-component decomposition: closed-form pieces and the convex-model pattern."""

import numpy as np
import pytest
import torch

from fidelity.decomposition import (
    Stage,
    components_between,
    decompose,
    measurement_gap,
    output_distance,
    stage_outputs,
)
from fidelity.estimators import ExactEstimator, GradCosEstimator
from fidelity.metrics import pearson
from fidelity.retrain import (
    ColdResponse,
    LinearResponse,
    PbrfResponse,
    ProximalResponse,
    WarmResponse,
)


def test_components_between_names_every_skipped_step():
    assert components_between("cold", "warm") == ["warm vs cold start"]
    assert components_between("warm", "pbrf") == ["proximity", "non-convergence"]
    assert components_between("linear", "estimator") == ["solver error"]
    assert len(components_between("cold", "estimator")) == 5


def test_output_distance_is_the_mean_rms_output_difference(trained_problems):
    trained = trained_problems("cancer-logreg")
    generator = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(3, trained.n_params, generator=generator, dtype=torch.float64)
    first = trained.theta + noise
    second = trained.theta.expand(3, -1)
    x = trained.problem.x_train
    expected = np.mean(
        [
            float((trained.model(a, x) - trained.model(b, x)).pow(2).mean().sqrt())
            for a, b in zip(first, second, strict=True)
        ]
    )
    distance = output_distance(stage_outputs(trained, first), stage_outputs(trained, second))
    assert distance == pytest.approx(expected, rel=1e-12)


def test_measurement_gap():
    first, second = np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 2.5, 2.0]])
    gap = measurement_gap(first, second, scale=2.0)
    assert gap["relative_mae"] == pytest.approx(0.5 / 2.0)
    assert gap["one_minus_pearson"] == pytest.approx(1 - pearson(first, second))


def test_on_a_convex_model_only_the_linearisation_gap_remains(trained_problems):
    """Logistic regression trained to convergence: cold = warm = proximal(0) = pbrf(0), and the
    exact estimator is the linear stage, so every gap but linearisation vanishes."""
    trained = trained_problems("cancer-logreg")
    problem = trained.problem
    test, removed = problem.test, torch.arange(0, 80, 4)
    stages = []
    for label, response in [
        ("cold", ColdResponse()),
        ("warm", WarmResponse()),
        ("proximal", ProximalResponse(damping=0.0)),
        ("pbrf", PbrfResponse()),
        ("linear", LinearResponse()),
    ]:
        result = response.compute(trained, test, removed)
        stages.append(Stage(label, label, result.deltas.numpy(), result.thetas))
    train_removed = problem.train.subset(removed)
    exact = ExactEstimator().fit(trained)
    cosine = GradCosEstimator().fit(trained)
    changes = exact.parameter_changes(train_removed)
    estimators = {
        "exact": (exact.scores(test, train_removed).numpy(), changes),
        "grad-cos": (cosine.scores(test, train_removed).numpy(), None),
    }
    result = decompose(trained, stages, estimators)
    assert result.stages == ("cold", "warm", "proximal", "pbrf", "linear")
    by_component = {gap.components: gap for gap in result.gaps}
    for component in ("warm vs cold start", "proximity", "non-convergence"):
        gap = by_component[(component,)]
        assert gap.output_rms < 1e-8 and gap.relative_mae < 1e-6
    linearisation = by_component[("linearisation",)]
    assert linearisation.output_rms > 1e-6 and linearisation.relative_mae > 1e-3
    solver = result.estimators["exact"]
    assert solver.components == ("solver error",)
    assert solver.output_rms < 1e-10 and solver.relative_mae < 1e-8
    assert result.estimators["grad-cos"].output_rms is None


def test_skipped_stages_are_merged_and_a_lone_stage_gives_nothing(trained_problems):
    trained = trained_problems("diabetes-ridge")
    deltas = np.ones((2, 3))
    cold = Stage("cold", "cold", deltas, None)
    linear = Stage("lin", "linear", 2 * deltas, None)
    result = decompose(trained, [linear, cold], {})
    assert result.stages == ("cold", "lin")
    assert result.gaps[0].components == (
        "warm vs cold start",
        "proximity",
        "non-convergence",
        "linearisation",
    )
    assert result.gaps[0].output_rms is None
    assert result.gaps[0].relative_mae == pytest.approx(1.0)
    assert decompose(trained, [cold], {}) is None


def test_the_training_path_rung_compares_seed_zero_cold_with_replay(trained_problems):
    # cold's seed-0 deltas (not the seed mean) against replay, then replay against every other
    # estimator; each gap measured as the ladder's are
    trained = trained_problems("digits-mlp")
    generator = torch.Generator().manual_seed(0)
    mean, first = (
        torch.randn(3, 4, generator=generator, dtype=torch.float64).numpy() for _ in "ab"
    )
    replay, gnh = (
        torch.randn(3, 4, generator=generator, dtype=torch.float64).numpy() for _ in "ab"
    )
    step = 1e-3 * torch.randn(4, trained.n_params, generator=generator, dtype=torch.float64)
    cold = Stage("cold", "cold", mean, trained.theta + step, first_seed=first)
    found = decompose(
        trained,
        [cold],
        {"replay": (replay, 2 * step), "gnh": (gnh, None)},
        path="replay",
    )
    assert [(g.source, g.target, g.components) for g in found.path] == [
        ("cold", "replay", ("training-path nonlinearity",)),
        ("replay", "gnh", ("optimum assumption",)),
    ]
    scale = float(np.mean(np.abs(mean)))
    expected = measurement_gap(first, replay, scale)
    assert found.path[0].relative_mae == pytest.approx(expected["relative_mae"])
    assert found.path[0].one_minus_pearson == pytest.approx(expected["one_minus_pearson"])
    outputs = stage_outputs(trained, trained.theta + step)
    twice = stage_outputs(trained, trained.theta + 2 * step)
    assert found.path[0].output_rms == pytest.approx(output_distance(outputs, twice))
    assert found.path[1].output_rms is None  # gnh gave no parameter changes here
    # the estimators' own gaps to the last stage use the seed mean, as before
    assert found.estimators["replay"].relative_mae == pytest.approx(
        measurement_gap(mean, replay, scale)["relative_mae"]
    )
    assert decompose(trained, [cold], {"gnh": (gnh, None)}, path="replay").path == ()
