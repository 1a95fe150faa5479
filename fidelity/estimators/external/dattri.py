"""dattri 0.3.0's influence-function attributors (explicit, CG, LiSSA, Arnoldi, DataInf, EK-FAC)
behind our estimator contract.

Conventions mapped here, once (read from dattri's source and checked against our ``exact`` and
``ekfac`` on a tiny MLP, tests/estimators/test_dattri.py):
- dattri's ``attribute(train, test)`` is ``[n_train, n_test]`` (train rows): transposed here.
- Its score is g_train^T C^{-1} g_test with no minus sign and the gradients of the task's loss,
  which this adapter writes as the *mean* loss of a batch (dattri's per-example gradients see a
  batch of one; its Hessian sees the whole training set as one batch, so C is the Hessian of the
  mean training loss). Our removal delta is therefore the transposed score / N (same sign:
  positive means j helped).
- dattri's curvature knows no weight decay: ``regularization = wd + damping`` (explicit, cg,
  arnoldi, datainf) and EK-FAC's ``damping = wd + damping``.
- LiSSA: dattri iterates h <- v + (1 - d) h - (H_B h) / s and returns h / s, whose fixed point
  is (H + s d I)^{-1} v: our ``scale`` is its ``scaling`` s and its ``damping`` d is
  (wd + damping) / s. ``minibatch_size`` is its ``batch_size`` (None: the whole training set,
  deterministic; dattri's default is 1); ``repeats`` is its ``num_repeat``.
- explicit, CG and LiSSA sum their inverse-Hessian products over the batches of the cached
  training loader (with k batches that is sum_b (H_b + r I)^{-1} v, not (H + r I)^{-1} v), and
  recompute them for every pair of train and test batches: the adapter hands them the training
  set, the scored training points and the test points each as one batch.
- CG runs exactly ``iterations`` steps from x0 = v: dattri ignores its ``tol``.
- Arnoldi: ``rank`` is its ``proj_dim`` and ``iterations`` its ``max_iter`` (it takes
  min(p + 1, max_iter) - 1 Krylov steps), ``tol`` its breakdown tolerance, ``seed`` its seed.
  Its Krylov basis is not re-orthogonalised; its guard against non-positive Ritz values lowers
  ``proj_dim`` but keeps them, so 1/sqrt of a negative value gives NaN scores (counted in
  diagnostics as ``nonfinite_scores``; dattri's warnings are in ``library_warnings``).
- DataInf: per layer (parameters grouped by module) it replaces (G_l + r I)^{-1} by
  (1/N) sum_i (g_il g_il^T + r I)^{-1} (Kwon et al. 2024), with r = wd + damping as above; it is
  not an estimate of the exact solve, and is compared with that closed form.
- EK-FAC: the Fisher is the *empirical* one (backward passes of the training loss at the training
  labels) over every ``nn.Linear`` (``layers``: fnmatch patterns of module names, of which the
  nn.Linear ones are used); other parameters are left out, as with our ``ekfac``'s ``layers``.
  Equal to our ``ekfac(fisher="empirical")`` except for two defects of
  dattri 0.3.0, which this adapter does not correct (measured in the tests): it rotates into the
  basis of the *rows* of torch.linalg.eigh's eigenvector matrices (Q X Q^T instead of
  Q^T X Q), and for a layer with a bias it lays the test gradient out as
  reshape(cat(W.flatten(), b), [out, in + 1]) instead of [W | b].
- dattri allocates its buffers in torch's default dtype (with float32 there, Arnoldi and DataInf
  fail on float64 data and the other solvers return float32 scores): every call into dattri runs
  with the default dtype set to the problem's, restored afterwards. dattri's LiSSA casts every
  data tensor to float32 before its Hessian-vector products: the loss handed to dattri casts
  inputs back to the problem's dtype and class labels back to integers. Its random draws (LiSSA
  minibatches, Arnoldi's start vector, for which it calls torch.manual_seed) run in a forked RNG
  seeded with ``seed``.
- The model is a fresh module with theta_s loaded (``trained_module``); dattri computes every
  gradient with its own code on it.
"""

from __future__ import annotations

import fnmatch
import time
from typing import Any, Self

import torch
from torch import Tensor, nn

from fidelity.core.checks import check_int, check_nonnegative, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.estimators.base import Estimator
from fidelity.estimators.external import (
    examples_loader,
    library_context,
    record_scores,
    trained_module,
    with_parent,
)
from fidelity.estimators.kfac import check_layers

SOLVERS = ("explicit", "cg", "lissa", "arnoldi", "datainf", "ekfac")
# Solvers that recompute their inverse-Hessian products for every (train batch, test batch).
WHOLE_BATCH_SOLVERS = ("explicit", "cg", "lissa")
INSTALL_HINT = (
    "dattri is not installed; create the peers environment with `bash benchmarks/peers_env.sh`"
)


def _import_dattri() -> tuple[Any, dict[str, Any]]:
    try:
        from dattri.algorithm.influence_function import (
            IFAttributorArnoldi,
            IFAttributorCG,
            IFAttributorDataInf,
            IFAttributorEKFAC,
            IFAttributorExplicit,
            IFAttributorLiSSA,
        )
        from dattri.task import AttributionTask
    except ImportError as error:
        raise FidelityError(INSTALL_HINT) from error
    attributors = {
        "explicit": IFAttributorExplicit,
        "cg": IFAttributorCG,
        "lissa": IFAttributorLiSSA,
        "arnoldi": IFAttributorArnoldi,
        "datainf": IFAttributorDataInf,
        "ekfac": IFAttributorEKFAC,
    }
    return AttributionTask, attributors


class DattriEstimator(Estimator):
    """dattri's influence function with ``solver`` explicit, cg, lissa or arnoldi (the Hessian
    of the mean training loss plus (wd + damping) I: the estimand of our ``exact`` at the same
    damping), datainf (DataInf's per-layer closed form with r = wd + damping) or ekfac (EK-FAC of
    the empirical Fisher plus (wd + damping) I), converted to delta_hat[t, j]: the predicted
    change of test loss t when training point j is removed (epsilon = -1/N, positive = j
    helped), shaped [n_test, n_train]. Non-finite scores are returned as dattri gives them and
    counted in ``diagnostics["nonfinite_scores"]``.

    Settings (the module docstring maps each to dattri's): ``iterations`` CG steps or Arnoldi's
    ``max_iter``; ``rank`` and ``tol`` Arnoldi's ``proj_dim`` and breakdown tolerance;
    ``depth``, ``scale``, ``minibatch_size`` (None: every training point) and ``repeats`` for
    LiSSA; ``layers`` (fnmatch patterns; nn.Linear modules only) for EK-FAC; ``seed`` seeds the
    RNG dattri draws from; ``batch_size`` is the batch of the train and test loaders of
    arnoldi, datainf and ekfac (the other solvers get each set as one batch)."""

    name = "dattri"

    def __init__(
        self,
        *,
        solver: str = "explicit",
        damping: float = 0.0,
        iterations: int = 100,
        rank: int = 100,
        tol: float = 1e-7,
        depth: int = 5000,
        scale: float = 50.0,
        minibatch_size: int | None = None,
        repeats: int = 1,
        layers: str | list[str] | None = None,
        seed: int = 0,
        batch_size: int = 512,
    ) -> None:
        if solver not in SOLVERS:
            raise FidelityError(f"dattri.solver must be one of {', '.join(SOLVERS)}")
        self.solver = solver
        self.damping = check_nonnegative(damping, "dattri.damping")
        self.iterations = check_positive_int(iterations, "dattri.iterations")
        self.rank = check_positive_int(rank, "dattri.rank")
        self.tol = check_nonnegative(tol, "dattri.tol")
        self.depth = check_positive_int(depth, "dattri.depth")
        self.scale = check_nonnegative(scale, "dattri.scale")
        if self.scale == 0:
            raise FidelityError("dattri.scale must be > 0")
        if minibatch_size is not None:
            check_positive_int(minibatch_size, "dattri.minibatch_size")
        self.minibatch_size = minibatch_size
        self.repeats = check_positive_int(repeats, "dattri.repeats")
        self.layers = check_layers(layers, "dattri")
        if self.layers is not None and solver != "ekfac":
            raise FidelityError("dattri.layers applies to solver 'ekfac' only")
        self.seed = check_int(seed, "dattri.seed")
        self.batch_size = check_positive_int(batch_size, "dattri.batch_size")

    def _loss(self, trained: TrainedProblem, module: nn.Module):
        problem = trained.problem

        def loss(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            x, y = data
            # dattri's LiSSA hands over float32 copies of every data tensor.
            x = x.to(problem.dtype)
            y = y.long() if problem.loss == "cross_entropy" else y.to(problem.dtype)
            outputs = torch.func.functional_call(module, params, (x,))
            return loss_from_outputs(problem.loss, outputs, y).mean()

        return loss

    def _ekfac_modules(self, module: nn.Module) -> list[str] | None:
        """The nn.Linear modules ``layers`` selects (None: dattri's default, every nn.Linear);
        other module kinds are skipped, as our ``ekfac`` skips unsupported ones."""
        if self.layers is None:
            return None
        patterns = [self.layers] if isinstance(self.layers, str) else self.layers
        names = [
            name
            for name, child in module.named_modules()
            if isinstance(child, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
        ]
        if not names:
            raise FidelityError(f"dattri.layers {patterns} match no nn.Linear module")
        return names

    def _attributor(self, trained: TrainedProblem, task_cls: Any, attributors: dict) -> Any:
        problem = trained.problem
        module = with_parent(trained_module(trained))  # dattri found no parameters in a bare layer
        task = task_cls(
            loss_func=self._loss(trained, module),
            model=module,
            checkpoints=module.state_dict(),
        )
        common = {"task": task, "device": str(problem.device)}
        shift = problem.weight_decay + self.damping
        cls = attributors[self.solver]
        if self.solver == "explicit":
            return cls(**common, regularization=shift)
        if self.solver == "cg":
            return cls(**common, max_iter=self.iterations, regularization=shift)
        if self.solver == "lissa":
            return cls(
                **common,
                batch_size=self.minibatch_size or problem.n_train,
                num_repeat=self.repeats,
                recursion_depth=self.depth,
                damping=shift / self.scale,
                scaling=self.scale,
            )
        if self.solver == "arnoldi":
            return cls(
                **common,
                proj_dim=self.rank,
                max_iter=self.iterations,
                tol=self.tol,
                regularization=shift,
                seed=self.seed,
            )
        if self.solver == "datainf":
            return cls(**common, regularization=shift)
        return cls(**common, module_name=self._ekfac_modules(module), damping=shift)

    def fit(self, trained: TrainedProblem) -> Self:
        task_cls, attributors = _import_dattri()
        start = time.perf_counter()
        problem = trained.problem
        if problem.weight_decay + self.damping <= 0 and self.solver == "datainf":
            raise FidelityError("dattri's DataInf divides by wd + damping: set damping above 0")
        with library_context(trained, self.seed, "dattri") as messages:
            self.attributor_ = self._attributor(trained, task_cls, attributors)
            self.attributor_.cache(examples_loader(problem.train, problem.n_train))
            if self.solver == "arnoldi":
                # dattri runs the Arnoldi iteration at the first projection: do it here.
                with torch.no_grad():
                    self.attributor_.arnoldi_projectors[0](
                        trained.theta.new_zeros((1, trained.n_params))
                    )
        self.trained_ = trained
        self.diagnostics_ = {
            "fit_seconds": time.perf_counter() - start,
            "library_warnings": messages,
        }
        if self.solver == "ekfac":
            self.diagnostics_["layers"] = list(self.attributor_.module_name)
        return self

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        whole = self.solver in WHOLE_BATCH_SOLVERS
        train_loader = examples_loader(train, len(train) if whole else self.batch_size)
        test_loader = examples_loader(test, len(test) if whole else self.batch_size)
        with library_context(trained, self.seed, "dattri") as messages, torch.no_grad():
            raw = self.attributor_.attribute(train_loader, test_loader)
        deltas = raw.detach().T.to(trained.theta) / trained.problem.n_train
        record_scores(self.diagnostics_, deltas, time.perf_counter() - start, messages)
        return deltas
