"""dattri 0.3.0's influence-function attributors (explicit, CG, LiSSA, Arnoldi, DataInf, EK-FAC),
its TRAK, TracIn and LoGra behind our estimator contract.

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
- TRAK (``trak``): the task's loss is the true class's margin (TRAK's output function, our
  ``trak``'s), ``correct_probability_func`` its probability; dattri divides the gradients by
  sqrt(p), projects them (``projection_dim``; None: its ``identity`` projection) and returns
  ``[train, test]`` values phi_t (X^T X + r I)^{-1} phi_j (1 - p_j) averaged over its checkpoints
  (theta_s alone here), so our delta is (1 - p_t) times the transposed value, with
  r = damping N / p (identity projection) or damping N k / p (its Gaussian projection, N(0, 1)
  entries against our N(0, 1/k)) to match our (1/N) Phi^T Phi + damping I: exact for the
  identity, in expectation for the Gaussian. Cross-entropy problems (the margin is the class's).
- TracIn (``tracin``): sum over checkpoints of weight x g_train^T g_test; one checkpoint
  (theta_s) of weight 1 and the identity projection make it our ``grad-dot`` (value / N).
- LoGra (``logra``): per nn.Linear layer (``layers`` selects some), each example's gradient
  [W | b] projected on both sides by Gaussian matrices of sqrt(``projection_dim``) columns
  each (dattri's LoGraAttributor), the layer's empirical Fisher (1/N) sum_i g_i g_i^T in that
  space, damped by ``damping`` times its mean eigenvalue (dattri's relative damping; 0 means its
  default 1e-5, and no weight decay), inverted per layer (block diagonal across layers). With
  ``projection_dim`` None the adapter runs the same pipeline with dattri's identity projections
  (its BlockProjectedIFAttributor): the damped per-layer empirical Fisher influence, equal to
  a dense float64 reference to 1e-5 (tests). Defects of dattri 0.3.0 worked around here: with
  (x, y) batches it sizes its projections on x[0] (one unbatched example) and crashes on a
  Linear layer with a bias, and its test gradients are those of ``cross_entropy`` (mean) of the
  model's outputs whatever the task's loss, so the adapter hands it dict batches and a model
  whose output with labels carries the problem's mean ``loss``; its hooks multiply per-example
  gradients by the batch size (a mean loss is expected); its Fisher is accumulated in float32
  (the adapter runs it on a float32 copy); it keeps batch metadata in a file of its
  ``cache_dir`` (default: the working directory) and reuses a file it finds, so a second fit of
  another training set there fails (a shape error): each fit gets its own temporary directory;
  it scores every cached training point (the scored points' rows are picked). Our ``logra``
  differs in kind (one Fisher over all covered layers, absolute damping wd + damping, its own
  random matrices): it is compared with dattri's by correlation with the responses, not as a
  reference.
- dattri 0.3.0's TRAK and TracIn update the module-level dict of default projector settings in
  place (``DEFAULT_PROJECTOR_KWARGS.update(...)``), so one attributor's projector settings become
  the next one's defaults: the adapter passes every setting each time.
"""

from __future__ import annotations

import fnmatch
import math
import tempfile
import time
from types import SimpleNamespace
from typing import Any, Self

import torch
from torch import Tensor, nn

from fidelity.core.checks import check_int, check_nonnegative, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs, target_from_outputs, target_values
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.estimators.base import Estimator
from fidelity.estimators.external import (
    default_dtype,
    examples_loader,
    library_context,
    record_scores,
    rows_of,
    trained_module,
    with_parent,
)
from fidelity.estimators.kfac import check_layers

SOLVERS = ("explicit", "cg", "lissa", "arnoldi", "datainf", "ekfac", "trak", "tracin", "logra")
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
        from dattri.algorithm.logra import LoGraAttributor
        from dattri.algorithm.tracin import TracInAttributor
        from dattri.algorithm.trak import TRAKAttributor
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
        "trak": TRAKAttributor,
        "tracin": TracInAttributor,
        "logra": LoGraAttributor,
    }
    return AttributionTask, attributors


class DattriEstimator(Estimator):
    """dattri's influence function with ``solver`` explicit, cg, lissa or arnoldi (the Hessian
    of the mean training loss plus (wd + damping) I: the estimand of our ``exact`` at the same
    damping), datainf (DataInf's per-layer closed form with r = wd + damping), ekfac (EK-FAC of
    the empirical Fisher plus (wd + damping) I), trak (the estimand of our ``trak`` with one
    model and the same ``projection_dim`` and damping) or tracin (at theta_s: our
    ``grad-dot``), converted to delta_hat[t, j]: the predicted
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
        projection_dim: int | None = None,
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
        if self.layers is not None and solver not in ("ekfac", "logra"):
            raise FidelityError("dattri.layers applies to solvers 'ekfac' and 'logra' only")
        if projection_dim is not None:
            check_positive_int(projection_dim, "dattri.projection_dim")
            if solver not in ("trak", "logra"):
                raise FidelityError("dattri.projection_dim applies to solvers 'trak' and 'logra'")
            if solver == "logra" and math.isqrt(projection_dim) ** 2 != projection_dim:
                raise FidelityError(
                    f"dattri.projection_dim for logra must be a perfect square (its two "
                    f"factors are sqrt of it each), got {projection_dim}"
                )
        self.projection_dim = projection_dim
        self.seed = check_int(seed, "dattri.seed")
        self.batch_size = check_positive_int(batch_size, "dattri.batch_size")

    def _loss(self, trained: TrainedProblem, module: nn.Module):
        problem = trained.problem

        def loss(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            x, y = data
            # dattri's LiSSA hands over float32 copies of every data tensor.
            x = x.to(problem.dtype)
            y = y.long() if problem.loss == "cross_entropy" else y.to(problem.dtype)
            if x.dim() < problem.x_train.dim():
                # dattri's per-example gradients call this with one unbatched example: a
                # model that reshapes its input (a CNN) would make a batch of one of x alone
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            outputs = torch.func.functional_call(module, params, (x,))
            return loss_from_outputs(problem.loss, outputs, y).mean()

        return loss

    def _linear_modules(self, module: nn.Module) -> list[str] | None:
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

    def _margin_functions(self, trained: TrainedProblem, module: nn.Module):
        """TRAK's output function (the true class's margin, summed over a batch) and the true
        class's probability per example, as dattri's TRAK takes them."""
        problem = trained.problem

        def batched(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            # dattri calls these per example (vmapped): give the model a batch of one
            x = x.to(problem.dtype)
            if x.dim() < problem.x_train.dim():
                x, y = x.unsqueeze(0), y.reshape(1)
            return x, y.long()

        def measured(params: dict[str, Tensor], data: tuple[Tensor, Tensor], target: str):
            x, y = batched(*data)
            outputs = torch.func.functional_call(module, params, (x,))
            return target_from_outputs(problem.loss, outputs, y, target)

        def margin(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            return measured(params, data, "margin").sum()

        def probability(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            return measured(params, data, "log-probability").exp()

        return margin, probability

    def _attributor(self, trained: TrainedProblem, task_cls: Any, attributors: dict) -> Any:
        problem = trained.problem
        module = with_parent(trained_module(trained))  # dattri found no parameters in a bare layer
        cls = attributors[self.solver]
        if self.solver == "trak":
            margin, probability = self._margin_functions(trained, module)
            task = task_cls(loss_func=margin, model=module, checkpoints=module.state_dict())
            dimension = self.projection_dim or trained.n_params
            return cls(
                task=task,
                correct_probability_func=probability,
                projector_kwargs={
                    "proj_dim": dimension,
                    "proj_max_batch_size": 32,
                    "proj_seed": self.seed,
                    "proj_type": "normal" if self.projection_dim else "identity",
                    "device": str(problem.device),
                },
                device=str(problem.device),
                # its X is the gradients over sqrt(p), projected by N(0, 1) entries (k of
                # them: X^T X is k/p times our Phi^T Phi) or not at all (1/p times)
                regularization=self.damping
                * problem.n_train
                * (self.projection_dim or 1)
                / trained.n_params,
            )
        task = task_cls(
            loss_func=self._loss(trained, module),
            model=module,
            checkpoints=module.state_dict(),
        )
        common = {"task": task, "device": str(problem.device)}
        shift = problem.weight_decay + self.damping
        if self.solver == "tracin":
            return cls(
                **common,
                weight_list=torch.ones(1, dtype=problem.dtype),
                normalized_grad=False,
                projector_kwargs={
                    "proj_dim": trained.n_params,
                    "proj_max_batch_size": 32,
                    "proj_seed": self.seed,
                    "proj_type": "identity",
                    "device": str(problem.device),
                },
            )
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
        if self.solver == "logra":
            return self._logra(trained, task_cls, cls, module)
        return cls(**common, module_name=self._linear_modules(module), damping=shift)

    def _logra(self, trained: TrainedProblem, task_cls: Any, cls: Any, module: nn.Module) -> Any:
        problem = trained.problem
        loss = problem.loss

        def mean_loss(model: nn.Module, batch: Any, device: Any) -> Tensor:
            # LoGra's hooks read per-example gradients off one backward pass of the batch and
            # multiply them by the batch size: the loss is the batch mean
            return model(**batch).loss

        names = self._linear_modules(module)
        # dict batches (with (x, y) tuples dattri sizes its projections on x[0], one unbatched
        # example, and crashes on a Linear layer with a bias), in float32 (its Fisher
        # accumulators are float32 whatever the data)
        wrapped = KeywordInputs(module, loss).float()
        task = task_cls(loss_func=mean_loss, model=wrapped, checkpoints=wrapped.state_dict())
        # dattri keeps batch metadata in a file of its cache_dir (default: the working
        # directory) and reuses it when it finds one: a fit of another training set there would
        # read the last one's sample count. Each fit gets its own directory.
        self.workdir_ = tempfile.TemporaryDirectory(prefix="fidelity-dattri-logra-")
        common = {
            "task": task,
            "device": str(problem.device),
            "layer_names": None if names is None else [f"inner.{name}" for name in names],
            "hessian": "eFIM",
            "damping": self.damping or None,
            "offload": "none",
            "cache_dir": self.workdir_.name,
        }
        if self.projection_dim is not None:
            return cls(**common, proj_dim=self.projection_dim)
        from dattri.algorithm.block_projected_if.block_projected_if import (
            BlockProjectedIFAttributor,
        )

        identity = {
            "device": str(problem.device),
            "proj_dim": -1,
            "proj_max_batch_size": 64,
            "proj_type": "identity",
        }
        return BlockProjectedIFAttributor(
            **common, sparsifier_kwargs=identity, projector_kwargs=identity
        )

    def fit(self, trained: TrainedProblem) -> Self:
        task_cls, attributors = _import_dattri()
        start = time.perf_counter()
        problem = trained.problem
        if problem.weight_decay + self.damping <= 0 and self.solver == "datainf":
            raise FidelityError("dattri's DataInf divides by wd + damping: set damping above 0")
        if self.solver == "trak" and problem.loss != "cross_entropy":
            raise FidelityError(
                f"dattri's TRAK here takes a cross_entropy problem; {problem.name!r} is "
                f"{problem.loss}"
            )
        if (
            self.solver == "trak"
            and self.projection_dim is not None
            and self.projection_dim > trained.n_params
        ):
            raise FidelityError(
                f"dattri.projection_dim is {self.projection_dim}, but the model has "
                f"{trained.n_params} parameters"
            )
        with library_context(trained, self.seed, "dattri") as messages:
            self.attributor_ = self._attributor(trained, task_cls, attributors)
            if self.solver == "trak":
                self.attributor_.cache(examples_loader(problem.train, self.batch_size))
            elif self.solver == "logra":
                with default_dtype(torch.float32):  # its projections follow the default
                    self.attributor_.cache(keyword_loader(problem.train, self.batch_size))
            elif self.solver != "tracin":  # TracIn caches nothing: it reads both loaders
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
        problem = trained.problem
        with library_context(trained, self.seed, "dattri") as messages, torch.no_grad():
            if self.solver == "trak":
                # TRAK scores its cached training set: pick the scored points' rows
                raw = self.attributor_.attribute(test_loader)[rows_of(train, problem)]
            elif self.solver == "logra":
                # LoGra scores every cached training point, whatever loader it is given
                # its test gradients come from a backward pass: grad mode on
                with default_dtype(torch.float32), torch.enable_grad():
                    raw = self.attributor_.attribute(
                        keyword_loader(train, self.batch_size),
                        keyword_loader(test, self.batch_size),
                    )
                raw = raw[rows_of(train, problem).to(raw.device)]
            else:
                raw = self.attributor_.attribute(train_loader, test_loader)
        deltas = raw.detach().T.to(trained.theta) / problem.n_train
        if self.solver == "trak":
            with torch.no_grad():
                correct = target_values(
                    trained.model, problem.loss, trained.theta, test, "log-probability"
                ).exp()
            deltas = (1 - correct)[:, None] * deltas * problem.n_train
        record_scores(self.diagnostics_, deltas, time.perf_counter() - start, messages)
        return deltas


class KeywordInputs(nn.Module):
    """``module`` as dattri's LoGra calls it with a dict batch, ``model(x=..., y=...)``: with
    labels it returns an object whose ``loss`` is the batch's mean loss (LoGra's test
    gradients are the backward pass of that ``loss``; it ignores the task's loss function),
    without them the model's outputs."""

    def __init__(self, inner: nn.Module, loss: str) -> None:
        super().__init__()
        self.inner = inner
        self.loss = loss

    def forward(self, x: Tensor, y: Tensor | None = None) -> Any:
        outputs = self.inner(x)
        if y is None:
            return outputs
        y = y.long() if self.loss == "cross_entropy" else y
        return SimpleNamespace(loss=loss_from_outputs(self.loss, outputs, y).mean())


class _KeywordExamples(torch.utils.data.Dataset):
    def __init__(self, data: Examples) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        y = self.data.y[index]
        return {"x": self.data.x[index].float(), "y": y.float() if y.is_floating_point() else y}


def keyword_loader(data: Examples, batch_size: int) -> torch.utils.data.DataLoader:
    """``data`` as a DataLoader of float32 ``{"x": ..., "y": ...}`` batches, in order."""
    return torch.utils.data.DataLoader(_KeywordExamples(data), batch_size=max(1, batch_size))
