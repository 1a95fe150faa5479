"""Influence estimators, all in DESIGN.md's contract and sign convention."""

from fidelity.core.registry import Registry
from fidelity.estimators.arnoldi import ArnoldiEstimator
from fidelity.estimators.base import (
    Estimator,
    GroupEffects,
    InverseCurvatureEstimator,
    perturbation_effects,
)
from fidelity.estimators.baselines import (
    GradCosEstimator,
    GradDotEstimator,
    RepresentationEstimator,
)
from fidelity.estimators.cg import ConjugateGradientEstimator
from fidelity.estimators.datainf import DataInfEstimator
from fidelity.estimators.diagonal import DiagonalEstimator
from fidelity.estimators.exact import ExactEstimator, GaussNewtonEstimator
from fidelity.estimators.kfac import EkfacEstimator, KfacEstimator
from fidelity.estimators.lissa import LissaEstimator
from fidelity.estimators.logra import LograEstimator
from fidelity.estimators.newton_step import NewtonStepEstimator, RescaledInfluenceEstimator
from fidelity.estimators.precomputed import PrecomputedEstimator
from fidelity.estimators.replay import ReplayEstimator, TracInCheckpointsEstimator
from fidelity.estimators.source import SourceEstimator
from fidelity.estimators.trak import TrakEstimator

ESTIMATORS: Registry[type[Estimator]] = Registry("estimator", base=Estimator)
for _estimator in (
    ExactEstimator,
    GaussNewtonEstimator,
    ConjugateGradientEstimator,
    LissaEstimator,
    ArnoldiEstimator,
    KfacEstimator,
    EkfacEstimator,
    GradDotEstimator,
    GradCosEstimator,
    NewtonStepEstimator,
    RescaledInfluenceEstimator,
    PrecomputedEstimator,
    ReplayEstimator,
    SourceEstimator,
    TracInCheckpointsEstimator,
    TrakEstimator,
    DataInfEstimator,
    RepresentationEstimator,
    DiagonalEstimator,
    LograEstimator,
):
    ESTIMATORS.register(_estimator.name)(_estimator)

__all__ = [
    "ESTIMATORS",
    "ArnoldiEstimator",
    "ConjugateGradientEstimator",
    "DataInfEstimator",
    "DiagonalEstimator",
    "EkfacEstimator",
    "Estimator",
    "ExactEstimator",
    "GaussNewtonEstimator",
    "GradCosEstimator",
    "GradDotEstimator",
    "GroupEffects",
    "InverseCurvatureEstimator",
    "KfacEstimator",
    "LissaEstimator",
    "LograEstimator",
    "NewtonStepEstimator",
    "PrecomputedEstimator",
    "ReplayEstimator",
    "RepresentationEstimator",
    "RescaledInfluenceEstimator",
    "SourceEstimator",
    "TracInCheckpointsEstimator",
    "TrakEstimator",
    "perturbation_effects",
]
