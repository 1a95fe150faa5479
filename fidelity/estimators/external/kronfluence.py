"""kronfluence (Grosse et al. 2023's EK-FAC implementation) behind our estimator contract.

Conventions mapped here, once:
- kronfluence's pairwise score is g_q^T (F + damping_factor I)^{-1} g_j with summed (not mean)
  losses, so its F is the mean per-example Fisher, like our G, and our delta is its score / N
  (same sign: positive means j helped the query's loss).
- Our curvature includes weight decay (G + wd I) and our ``damping`` comes on top;
  kronfluence knows no weight decay, so ``damping_factor = wd + damping``.
- ``fisher="sampled"`` is kronfluence's true Fisher; the labels are drawn by fidelity's own
  sampler (``fidelity.estimators.kfac.sampled_targets``, same ``seed`` and ``batch_size``) and
  handed to kronfluence's task, so that both libraries see the same draws and a comparison
  measures the implementations, not sampling noise. ``"empirical"`` uses the training labels
  (``use_empirical_fisher=True``).
- Factors, eigendecompositions, Lambda, per-sample gradients and scores all in float64.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any, Self

import torch
from torch import Tensor, nn

from fidelity.core.checks import check_int, check_nonnegative, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.estimators.base import Estimator
from fidelity.estimators.external import trained_module, with_parent
from fidelity.estimators.kfac import sampled_targets

INSTALL_HINT = (
    "kronfluence is not installed; create the peers environment with "
    "`bash benchmarks/peers_env.sh` (kronfluence 1.0.1 without its unused torchvision pin)"
)


def _import_kronfluence():
    try:
        import kronfluence  # noqa: F401
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError as error:
        raise FidelityError(INSTALL_HINT) from error
    return Analyzer, prepare_model, FactorArguments, ScoreArguments, Task


def _make_task(task_base: type, loss: str) -> Any:
    class LossTask(task_base):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            # Training batches carry (x, y, sampled y); the sampled labels were drawn up front.
            x, y = batch[0], batch[2] if sample else batch[1]
            return loss_from_outputs(loss, model(x), y).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            x, y = batch[0], batch[1]
            return loss_from_outputs(loss, model(x), y).sum()

    return LossTask()


class KronfluenceEstimator(Estimator):
    """kronfluence's pairwise scores (``strategy`` ``ekfac``, ``kfac``, ``diagonal`` or
    ``identity``) converted to delta_hat[t, j] (removal of j, epsilon = -1/N): score / N, with
    kronfluence's ``damping_factor`` set to wd + ``damping``."""

    name = "kronfluence"

    def __init__(
        self,
        *,
        strategy: str = "ekfac",
        fisher: str = "sampled",
        damping: float = 0.0,
        batch_size: int = 512,
        seed: int = 0,
    ) -> None:
        if strategy not in ("ekfac", "kfac", "diagonal", "identity"):
            raise FidelityError(f"kronfluence.strategy: unknown strategy {strategy!r}")
        if fisher not in ("sampled", "empirical"):
            raise FidelityError("kronfluence.fisher must be sampled or empirical")
        self.strategy = strategy
        self.fisher = fisher
        self.damping = check_nonnegative(damping, "kronfluence.damping")
        self.batch_size = check_positive_int(batch_size, "kronfluence.batch_size")
        self.seed = check_int(seed, "kronfluence.seed")

    def fit(self, trained: TrainedProblem) -> Self:
        analyzer_cls, prepare_model, factor_args_cls, _, task_cls = _import_kronfluence()
        start = time.perf_counter()
        problem = trained.problem
        # A bare layer has no parent to be replaced in: prepare_model recursed without end.
        module = with_parent(trained_module(trained))
        task = _make_task(task_cls, problem.loss)
        self.task_ = task
        self.module_ = prepare_model(module, task)
        self.workdir_ = tempfile.TemporaryDirectory(prefix="fidelity-kronfluence-")
        self.analyzer_ = analyzer_cls(
            analysis_name="fidelity",
            model=self.module_,
            task=task,
            cpu=problem.device.type == "cpu",
            disable_tqdm=True,
            output_dir=self.workdir_.name,
        )
        float64 = torch.float64
        self.factor_args_ = factor_args_cls(
            strategy=self.strategy,
            use_empirical_fisher=self.fisher == "empirical",
            covariance_max_examples=None,
            lambda_max_examples=None,
            activation_covariance_dtype=float64,
            gradient_covariance_dtype=float64,
            eigendecomposition_dtype=float64,
            per_sample_gradient_dtype=float64,
            lambda_dtype=float64,
        )
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            sampled = torch.cat(
                [
                    sampled_targets(problem.loss, trained.model(trained.theta, x), generator)
                    for x in problem.x_train.split(self.batch_size)
                ]
            )
        dataset = torch.utils.data.TensorDataset(problem.x_train, problem.y_train, sampled)
        self.analyzer_.fit_all_factors(
            factors_name="factors",
            dataset=dataset,
            per_device_batch_size=self.batch_size,
            factor_args=self.factor_args_,
            overwrite_output_dir=True,
        )
        self.trained_ = trained
        self.diagnostics_ = {"fit_seconds": time.perf_counter() - start}
        return self

    def scores(self, test: Examples, train: Examples) -> Tensor:
        _, _, _, score_args_cls, _ = _import_kronfluence()
        trained = self._check_fitted()
        start = time.perf_counter()
        float64 = torch.float64
        score_args = score_args_cls(
            damping_factor=trained.problem.weight_decay + self.damping,
            per_sample_gradient_dtype=float64,
            precondition_dtype=float64,
            score_dtype=float64,
        )
        self.analyzer_.compute_pairwise_scores(
            scores_name="scores",
            factors_name="factors",
            query_dataset=torch.utils.data.TensorDataset(test.x, test.y),
            train_dataset=torch.utils.data.TensorDataset(train.x, train.y),
            per_device_query_batch_size=min(self.batch_size, max(1, len(test))),
            per_device_train_batch_size=self.batch_size,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        raw = self.analyzer_.load_pairwise_scores("scores")["all_modules"]
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return raw.to(trained.theta) / trained.problem.n_train
