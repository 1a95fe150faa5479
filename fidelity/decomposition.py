"""Bae et al.'s (2022) decomposition of the gap between an influence estimator and leave-one-out
retraining into the steps of the response ladder (DESIGN.md).

Consecutive stages differ by one component; each gap is measured two ways: in output space (the
root mean square difference of the network outputs over the training inputs between the two
stages' parameters, averaged over the removed points: Bae et al.'s measure) and on the
measurement itself (mean |delta_a - delta_b| over mean |delta_cold|, and 1 - Pearson).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fidelity.core.problem import TrainedProblem
from fidelity.metrics import pearson
from fidelity.results import Decomposition, Gap, finite_or_none

LADDER = ("cold", "warm", "proximal", "pbrf", "linear")
COMPONENTS = {
    ("cold", "warm"): "warm vs cold start",
    ("warm", "proximal"): "proximity",
    ("proximal", "pbrf"): "non-convergence",
    ("pbrf", "linear"): "linearisation",
    ("linear", "estimator"): "solver error",
}
STEPS = ("cold", "warm", "proximal", "pbrf", "linear", "estimator")
#: The training-path rung: `cold` -> `replay`, then `replay` -> each estimator.
PATH_COMPONENTS = ("training-path nonlinearity", "optimum assumption")


@dataclass(frozen=True)
class Stage:
    """One rung's outcome: its label in the suite, its kind, its deltas ``[n_test, n_removed]``
    (a multi-seed response's mean over seeds) and the parameters it reached for each removal
    ``[n_removed, p]`` (seed 0's; None: not available)."""

    label: str
    kind: str
    deltas: np.ndarray
    thetas: Tensor | None
    # seed 0's deltas of a multi-seed response (paired with theta_s's own run, as ``thetas``)
    first_seed: np.ndarray | None = None


def components_between(first: str, second: str) -> list[str]:
    """The components a gap between two ladder steps spans (several when stages are skipped)."""
    start, stop = STEPS.index(first), STEPS.index(second)
    return [COMPONENTS[(STEPS[i], STEPS[i + 1])] for i in range(start, stop)]


def stage_outputs(trained: TrainedProblem, thetas: Tensor) -> Tensor:
    """The network outputs over the training inputs for each row of ``thetas``: ``[B, N, k]``.

    One model at a time, without autograd: vmapping the models batched every weight product
    (1.4x slower for 20 models of the fine-tuned MiniLM block, and 20 models' activations at
    once), and a model's forward pass over the training set is already a large product."""
    model, inputs = trained.model, trained.problem.x_train
    thetas = thetas.to(trained.theta)
    with torch.no_grad():
        outputs = [model(theta, inputs) for theta in thetas]
        if not outputs:
            width = model(trained.theta, inputs[:1]).shape[1:]
            return thetas.new_zeros((0, inputs.shape[0], *width))
        return torch.stack(outputs)


def output_distance(outputs_a: Tensor, outputs_b: Tensor) -> float:
    """Mean over removals of the RMS difference of two stages' outputs over the training
    inputs (each ``[B, N, k]``, from ``stage_outputs``)."""
    if outputs_a.shape[0] == 0:
        return float("nan")
    return float((outputs_a - outputs_b).pow(2).mean(dim=(1, 2)).sqrt().mean())


def measurement_gap(first: np.ndarray, second: np.ndarray, scale: float) -> dict[str, float]:
    """Mean |first - second| divided by ``scale`` (mean |delta_cold|), and 1 - Pearson."""
    mae = float(np.mean(np.abs(first - second)))
    return {
        "relative_mae": mae / scale if scale > 0 else float("nan"),
        # Rounding can put Pearson a hair above 1 for identical arrays.
        "one_minus_pearson": max(0.0, 1.0 - pearson(first, second)),
    }


def _optional(value: float | None) -> float | None:
    return None if value is None else finite_or_none(value)


def decompose(
    trained: TrainedProblem,
    stages: list[Stage],
    estimators: dict[str, tuple[np.ndarray, Tensor | None]],
    path: str | None = None,
) -> Decomposition | None:
    """The gaps between consecutive ladder stages present in ``stages`` (the first stage of each
    kind, in ladder order) and, for each estimator (deltas, predicted parameter changes or
    None), its gap to the last stage. None when fewer than two steps are present.

    ``path``: the label of the `replay` estimator (the exact first-order effect through the
    recorded training run), when there is one: the training-path rung then adds the gap
    `cold` -> replay (seed 0's retrains, paired with the run replay follows: how far retraining
    is from the first-order effect along the path, the path's nonlinearity) and replay -> each
    other estimator (what assuming an optimum, and the estimator's own approximations, cost).

    The measurement gaps are normalised by mean |delta| of `cold` (of the first stage present
    when there is no `cold`, which the result names as ``reference``).
    """
    chosen: dict[str, Stage] = {}
    for stage in stages:
        if stage.kind in LADDER and stage.kind not in chosen:
            chosen[stage.kind] = stage
    ladder = [chosen[kind] for kind in LADDER if kind in chosen]
    if not ladder or len(ladder) + bool(estimators) < 2:
        return None
    reference = ladder[0]
    scale = float(np.mean(np.abs(reference.deltas)))

    # each stage's outputs are computed once, however many gaps it takes part in (the last
    # rung is in one gap per estimator)
    computed: dict[int, Tensor] = {}

    def outputs(stage: Stage, thetas: Tensor) -> Tensor:
        if id(stage) not in computed:
            computed[id(stage)] = stage_outputs(trained, thetas)
        return computed[id(stage)]

    def gap(first: Stage, second: Stage) -> Gap:
        distance = None
        if first.thetas is not None and second.thetas is not None:
            distance = output_distance(outputs(first, first.thetas), outputs(second, second.thetas))
        measured = measurement_gap(first.deltas, second.deltas, scale)
        return Gap(
            source=first.label,
            target=second.label,
            components=tuple(components_between(first.kind, second.kind)),
            output_rms=_optional(distance),
            relative_mae=_optional(measured["relative_mae"]),
            one_minus_pearson=_optional(measured["one_minus_pearson"]),
        )

    gaps = [gap(a, b) for a, b in itertools.pairwise(ladder)]
    last = ladder[-1]
    theta_s = trained.theta.detach()
    as_stages = {
        label: Stage(
            label, "estimator", deltas, None if changes is None else theta_s + changes.to(theta_s)
        )
        for label, (deltas, changes) in estimators.items()
    }
    per_estimator = {label: gap(last, stage) for label, stage in as_stages.items()}
    path_gaps: list[Gap] = []
    if path is not None and path in as_stages and "cold" in chosen:
        replay = as_stages[path]
        # replay follows theta_s's own run: it is compared with the retrains of that seed
        cold = chosen["cold"]
        if cold.first_seed is not None:
            cold = dataclasses.replace(cold, deltas=cold.first_seed)
        path_gaps.append(_named(gap(cold, replay), PATH_COMPONENTS[0]))
        path_gaps += [
            _named(gap(replay, stage), PATH_COMPONENTS[1])
            for label, stage in as_stages.items()
            if label != path
        ]
    return Decomposition(
        reference=reference.label,
        stages=tuple(stage.label for stage in ladder),
        gaps=tuple(gaps),
        estimators=per_estimator,
        path=tuple(path_gaps),
    )


def _named(gap: Gap, component: str) -> Gap:
    return dataclasses.replace(gap, components=(component,))
