"""Shared problem and model types.

Everything here is imported by ``estimators`` and ``retrain``; it depends on torch only, never on
the runner, the CLI or the reports.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from fidelity.core.errors import FidelityError, user_code

LossName = Literal["cross_entropy", "bce", "mse"]
LOSSES: tuple[str, ...] = ("cross_entropy", "bce", "mse")


class Examples(NamedTuple):
    """A batch of inputs and targets; estimators score ``Examples`` against ``Examples``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, index: Tensor) -> Examples:
        return Examples(self.x[index], self.y[index])


@dataclass(frozen=True)
class NewtonRecipe:
    """Full-batch damped Newton training, for models that are convex in their parameters.

    The objective is minimised until the gradient norm is at most ``gtol`` and then for as long
    as each step still halves it, so parameters end at the floating-point floor of the problem.
    Because the minimiser of a strictly convex objective is unique, leave-one-out refits may
    start from theta_s (``refit_start="trained"``) and still give the exact refit.
    """

    gtol: float = 1e-10
    max_iter: int = 100
    init_seed: int = 0
    refit_start: Literal["trained", "init"] = "trained"
    kind: Literal["newton"] = "newton"

    def __post_init__(self) -> None:
        if not (self.gtol > 0 and math.isfinite(self.gtol)):
            raise FidelityError(f"NewtonRecipe.gtol must be a positive number, got {self.gtol!r}")
        if self.max_iter < 1:
            raise FidelityError(f"NewtonRecipe.max_iter must be >= 1, got {self.max_iter!r}")
        if self.refit_start not in ("trained", "init"):
            raise FidelityError(
                f"NewtonRecipe.refit_start must be 'trained' or 'init', got {self.refit_start!r}"
            )


# The version of fidelity.core.training.optimizer_step's floating-point arithmetic, part of a
# minibatch problem's fingerprint: a change moves trained models at rounding level (which a
# minibatch run can amplify), so cached runs of the old arithmetic must not be paired with new
# ones. 2: fused lerp/addcdiv steps.
OPTIMIZER_ARITHMETIC = 2


@dataclass(frozen=True)
class MinibatchRecipe:
    """Minibatch training for a fixed number of epochs (neural networks, not converged).

    Each epoch visits the training set in an order drawn from a generator seeded with
    ``order_seed`` (the order is a pure function of the seed, so every retrain sees the same
    batches); the last batch of an epoch may be smaller. A step follows the gradient of
    (1/|B|) sum_{i in B} w_i L_i + (wd/2) ||theta||^2, so weight decay is the L2 term of J (not
    decoupled), and a removed point (w_j = 0) leaves the 1/|B| unchanged. ``momentum`` is SGD's
    momentum or Adam's beta1.
    """

    optimizer: Literal["sgd", "adam"] = "adam"
    learning_rate: float = 1e-3
    epochs: int = 100
    batch_size: int = 64
    momentum: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    order_seed: int = 0
    init_seed: int = 0
    kind: Literal["minibatch"] = "minibatch"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise FidelityError(
                f"MinibatchRecipe.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}"
            )
        for name in ("learning_rate", "eps"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise FidelityError(f"MinibatchRecipe.{name} must be positive, got {value!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise FidelityError(f"MinibatchRecipe.{name} must be >= 1")
        for name in ("momentum", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise FidelityError(f"MinibatchRecipe.{name} must lie in [0, 1)")


Recipe = NewtonRecipe | MinibatchRecipe


@dataclass(frozen=True)
class Problem:
    """Data, model and training recipe: everything that determines theta_s.

    ``model_factory`` builds the architecture; it is called under a forked RNG seeded with the
    recipe's ``init_seed``, so the initial parameters are reproducible without global state.
    Targets are class indices (``cross_entropy``), 0/1 floats shaped ``[n, 1]`` (``bce``) or
    floats shaped ``[n, k]`` (``mse``). Model outputs are ``[n, classes]``, ``[n, 1]`` or
    ``[n, k]`` correspondingly.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    model_factory: Callable[[], nn.Module]
    loss: LossName
    weight_decay: float
    recipe: NewtonRecipe | MinibatchRecipe = field(default_factory=NewtonRecipe)
    description: str = ""
    train_texts: tuple[str, ...] | None = None
    test_texts: tuple[str, ...] | None = None
    # Text problems: maps new sentences to model inputs like x_test's (fidelity explain --text).
    featurize: Callable[[tuple[str, ...]], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise FidelityError(
                f"problem {self.name!r}: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"
            )
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise FidelityError(
                f"problem {self.name!r}: weight_decay must be >= 0, got {self.weight_decay!r}"
            )
        tensors = {
            "x_train": self.x_train,
            "y_train": self.y_train,
            "x_test": self.x_test,
            "y_test": self.y_test,
        }
        for label, tensor in tensors.items():
            if not isinstance(tensor, Tensor):
                raise FidelityError(f"problem {self.name!r}: {label} must be a torch.Tensor")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise FidelityError(
                    f"problem {self.name!r}: {label} holds {bad} NaN or infinite value(s); "
                    "clean or impute the data before building the problem"
                )
        if not self.x_train.is_floating_point():
            raise FidelityError(f"problem {self.name!r}: x_train must be a floating-point tensor")
        if self.x_test.dtype != self.x_train.dtype:
            raise FidelityError(f"problem {self.name!r}: x_test and x_train differ in dtype")
        for split in ("train", "test"):
            x, y = tensors[f"x_{split}"], tensors[f"y_{split}"]
            if x.shape[0] != y.shape[0]:
                raise FidelityError(
                    f"problem {self.name!r}: x_{split} has {x.shape[0]} rows, "
                    f"y_{split} has {y.shape[0]}"
                )
            if x.device != self.x_train.device or y.device != self.x_train.device:
                raise FidelityError(f"problem {self.name!r}: all tensors must be on one device")
            if self.loss == "cross_entropy" and y.dtype != torch.long:
                raise FidelityError(
                    f"problem {self.name!r}: cross_entropy targets y_{split} must be int64 "
                    "class indices"
                )
            if self.loss != "cross_entropy" and (y.dtype != x.dtype or y.dim() != 2):
                raise FidelityError(
                    f"problem {self.name!r}: {self.loss} targets y_{split} must be "
                    f"{x.dtype} and shaped [n, k], got {y.dtype} {tuple(y.shape)}"
                )
        if self.x_train.shape[0] < 2:
            raise FidelityError(f"problem {self.name!r}: needs at least two training points")
        if self.x_test.shape[0] < 1:
            raise FidelityError(f"problem {self.name!r}: the test split is empty")
        for split in ("train", "test"):
            _check_target_values(self.name, self.loss, f"y_{split}", tensors[f"y_{split}"])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.x_train.dtype

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    @property
    def train(self) -> Examples:
        return Examples(self.x_train, self.y_train)

    @property
    def test(self) -> Examples:
        return Examples(self.x_test, self.y_test)

    def build_model(self) -> nn.Module:
        """The architecture with its seeded initial parameters, on the problem's device/dtype."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.recipe.init_seed)
            with user_code(f"problem {self.name!r}: model_factory failed"):
                model = self.model_factory()
        if not isinstance(model, nn.Module):
            raise FidelityError(f"problem {self.name!r}: model_factory must return an nn.Module")
        return model.to(device=self.device, dtype=self.dtype)

    def fingerprint(self) -> str:
        """Hash of everything that determines theta_s and every retrain: training data, model
        code and initial parameters, loss, weight decay, recipe, dtype and device. The test
        split is not part of it (changing it reuses trained parameters), nor is the name."""
        digest = hashlib.sha256()
        model = self.build_model()
        recipe = {k: v for k, v in asdict(self.recipe).items() if k != "refit_start"}
        if isinstance(self.recipe, MinibatchRecipe):
            recipe["optimizer_arithmetic"] = OPTIMIZER_ARITHMETIC
        header = [self.loss, repr(self.weight_decay), repr(recipe)]
        header += [str(self.dtype), str(self.device), repr(model), model_source(model)]
        digest.update("\x1f".join(header).encode())
        for tensor in (self.x_train, self.y_train):
            digest.update(tensor_bytes(tensor))
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor_bytes(tensor))
        return digest.hexdigest()


def seeded_variant(problem: Problem, offset: int) -> Problem:
    """The problem with its recipe's initialisation (and batch-order) seed shifted by ``offset``:
    the same data, model and objective trained from another seed (training seeds of ``cold``,
    ensemble members of ``trak``)."""
    recipe = problem.recipe
    shifted: NewtonRecipe | MinibatchRecipe
    if isinstance(recipe, MinibatchRecipe):
        shifted = replace(
            recipe, init_seed=recipe.init_seed + offset, order_seed=recipe.order_seed + offset
        )
    else:
        shifted = replace(recipe, init_seed=recipe.init_seed + offset)
    return replace(problem, recipe=shifted)


def _check_target_values(name: str, loss: str, label: str, y: Tensor) -> None:
    """The values a loss accepts: class indices >= 0 for cross-entropy (the upper bound is the
    model's output width, checked by ``check_model``), exactly 0 or 1 for bce."""
    if not y.numel():
        return
    if loss == "cross_entropy":
        if y.dim() != 1:
            raise FidelityError(
                f"problem {name!r}: cross_entropy targets {label} must be shaped [n], "
                f"got {tuple(y.shape)}"
            )
        if int(y.min()) < 0:
            raise FidelityError(
                f"problem {name!r}: {label} holds class index {int(y.min())}; "
                "cross_entropy targets are class indices 0 .. classes-1"
            )
    elif loss == "bce":
        strange = y[(y != 0) & (y != 1)]
        if strange.numel():
            raise FidelityError(
                f"problem {name!r}: bce targets {label} must be 0 or 1; "
                f"{strange.numel()} are not (e.g. {float(strange[0]):g})"
            )


@dataclass(frozen=True)
class ModelCheck:
    """What one forward pass told about a problem's model."""

    n_params: int
    output_width: int


def check_model(problem: Problem) -> ModelCheck:
    """Build the model and run it on one training and one test row, before any training.

    The output must be ``[1, k]`` with finite values, as the loss expects: ``k`` above every
    class index for cross-entropy, the targets' width for bce and mse (targets are never
    broadcast against outputs). A model that cannot take the input is reported in one line.
    """
    model = problem.build_model()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_params == 0:
        raise FidelityError(f"problem {problem.name!r}: the model has no trainable parameters")
    widths = set()
    for split, x in (("train", problem.x_train), ("test", problem.x_test)):
        with (
            torch.no_grad(),
            user_code(f"problem {problem.name!r}: the model failed on one {split} row"),
        ):
            output = model(x[:1])
        if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != 1:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise FidelityError(
                f"problem {problem.name!r}: the model maps one {split} row to {shape}; "
                "it must return a tensor shaped [rows, outputs]"
            )
        if not bool(torch.isfinite(output).all()):
            raise FidelityError(
                f"problem {problem.name!r}: the model's output on a {split} row is not finite"
            )
        widths.add(int(output.shape[1]))
    if len(widths) != 1:
        raise FidelityError(
            f"problem {problem.name!r}: the model gives {sorted(widths)} outputs for a train and "
            "a test row; they must agree"
        )
    (width,) = widths
    for split, y in (("train", problem.y_train), ("test", problem.y_test)):
        if problem.loss == "cross_entropy":
            if width < 2:
                raise FidelityError(
                    f"problem {problem.name!r}: cross_entropy needs one output per class "
                    f"(at least 2), the model gives {width}; use bce for one logit"
                )
            if int(y.max()) >= width:
                raise FidelityError(
                    f"problem {problem.name!r}: y_{split} holds class index {int(y.max())}, "
                    f"but the model has {width} outputs (classes 0 .. {width - 1})"
                )
        elif int(y.shape[1]) != width:
            raise FidelityError(
                f"problem {problem.name!r}: {problem.loss} targets y_{split} are "
                f"{tuple(y.shape)}, the model gives {width} output(s) per row; they must match "
                "exactly (nothing is broadcast)"
            )
    return ModelCheck(n_params=int(n_params), output_width=width)


def tensor_bytes(tensor: Tensor) -> bytes:
    """Bytes that identify a tensor's dtype, shape and values (for content hashes)."""
    array = tensor.detach().cpu().contiguous()
    head = f"{array.dtype}{tuple(array.shape)}".encode()
    if not array.numel():
        return head
    return head + array.reshape(-1).view(torch.uint8).numpy().tobytes()


def model_source(model: nn.Module) -> str:
    """The source code of every module class in ``model`` (what ``forward`` computes), so that
    editing a model's code changes the fingerprint even when its parameters do not."""
    parts = []
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: c.__qualname__):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # defined interactively: the name is all there is
            source = ""
        parts.append(f"{cls.__module__}.{cls.__qualname__}\n{source}")
    return "\x1e".join(parts)


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a module's parameters, to move between dicts and flat vectors."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamSpec:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([params[name].reshape(-1) for name in self.names])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        chunks = torch.split(theta, list(self.sizes))
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}


@dataclass(frozen=True)
class FunctionalModel:
    """A module evaluated functionally at a flat parameter vector (torch.func.functional_call).

    The module's own parameters are never read for evaluation nor modified. Its initial
    parameters are copied once, at construction (``initial``), and ``initial_theta`` returns
    that copy: functional_call swaps the evaluated parameters into the module for the length
    of each call, so a copy of the module taken during one holds those instead. On dask a
    worker's retrains "from the initialisation" started at theta_s that way (the dask test's
    subsets, 0.033 off, in a third to a half of the runs of its file; most likely the scattered
    problem was copied from another worker's memory while a task ran there).
    """

    module: nn.Module
    spec: ParamSpec
    initial: Tensor

    @classmethod
    def of(cls, module: nn.Module) -> FunctionalModel:
        spec = ParamSpec.of(module)
        parameters = dict(module.named_parameters())
        # a module without parameters (refused later, with a message, by what needs some)
        initial = spec.flatten(parameters).detach().clone() if parameters else torch.zeros(0)
        return cls(module, spec, initial)

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        buffers = dict(self.module.named_buffers())
        params = self.spec.unflatten(theta)
        return torch.func.functional_call(self.module, {**params, **buffers}, (x,))

    def initial_theta(self) -> Tensor:
        return self.initial.clone()


@dataclass(frozen=True)
class OptimizerState:
    """Where the recipe's optimizer stands: SGD's momentum buffer (``first``) or Adam's first and
    second moments, ``[n_models, p]`` each, and the number of steps taken (Adam's bias
    correction). Warm-started retrains resume it, so that continued training takes the steps the
    recipe would have taken next instead of restarting the optimizer."""

    first: Tensor
    second: Tensor
    step: int

    @classmethod
    def fresh(cls, thetas: Tensor) -> OptimizerState:
        return cls(torch.zeros_like(thetas), torch.zeros_like(thetas), 0)

    def repeat(self, n_models: int) -> OptimizerState:
        """One model's state for ``n_models`` models."""
        if self.first.shape[0] != 1:
            raise FidelityError("only a single model's optimizer state can be repeated")
        return OptimizerState(
            self.first.expand(n_models, -1).clone(),
            self.second.expand(n_models, -1).clone(),
            self.step,
        )


@dataclass(frozen=True)
class Trajectory:
    """The recorded run of one model: the parameters and optimizer moments at every
    ``every``-th step (``steps[c]`` is the step count of checkpoint ``c``; the first is where
    the run started, the last its end), enough to replay any stretch of it."""

    every: int
    total_steps: int
    steps: tuple[int, ...]
    thetas: Tensor  # [checkpoints, p]
    first: Tensor  # [checkpoints, p]
    second: Tensor  # [checkpoints, p]

    def state(self, checkpoint: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.thetas[checkpoint], self.first[checkpoint], self.second[checkpoint]


@dataclass(frozen=True)
class TrainedProblem:
    """A problem with its trained parameters theta_s (flat) and how training went."""

    problem: Problem
    model: FunctionalModel
    theta: Tensor
    info: Mapping[str, object] = field(default_factory=dict)
    # A minibatch recipe's optimizer state at theta_s (one model), which warm starts resume.
    optimizer_state: OptimizerState | None = None
    # theta_s's recorded run (minibatch recipes, when training was asked to keep it)
    trajectory: Trajectory | None = None

    @property
    def n_params(self) -> int:
        return int(self.theta.numel())
