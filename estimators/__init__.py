"""Influence estimators, all in DESIGN.md's contract and sign convention."""

from estimators.arnoldi import ArnoldiEstimator
from estimators.base import Estimator, GroupEffects, InverseCurvatureEstimator
from estimators.baselines import GradCosEstimator, GradDotEstimator
from estimators.cg import ConjugateGradientEstimator
from estimators.exact import ExactEstimator, GaussNewtonEstimator
from estimators.kfac import EkfacEstimator, KfacEstimator
from estimators.lissa import LissaEstimator
from estimators.newton_step import NewtonStepEstimator, RescaledInfluenceEstimator
from estimators.precomputed import PrecomputedEstimator
from fidelity.core.registry import Registry

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
):
    ESTIMATORS.register(_estimator.name)(_estimator)

__all__ = [
    "ESTIMATORS",
    "ArnoldiEstimator",
    "ConjugateGradientEstimator",
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
    "NewtonStepEstimator",
    "PrecomputedEstimator",
    "RescaledInfluenceEstimator",
]
