"""Curvature of the training objective J as a linear operator (shared by estimators and the
response ladder).

``hessian``: H = (1/N) sum_i d^2 L_i / d theta^2 + wd I (reverse-over-reverse products).
``gnh``:     G = (1/N) sum_i J_i^T H_out,i J_i + wd I, J_i the Jacobian of the model outputs of
             example i, H_out,i the Hessian of the loss in output space (jvp, then vjp).
``empirical-fisher``: F = (1/N) sum_i g_i g_i^T + wd I, g_i the gradient of L_i at the training
             label (what pyDVL calls its Gauss-Newton mode). Not the Fisher: the labels are the
             data's, not the model's (Kunstner et al. 2019), so it is neither G nor H.

Products are accumulated over the training set in batches of ``batch_size`` examples; the result
does not depend on the batch size beyond floating-point summation order. Damping is not part of
the operator: estimators add it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import Tensor

from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs, output_hessian_factor, per_example_grads
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.core.resources import check_memory, dense_matrix_bytes

Curvature = Literal["hessian", "gnh", "empirical-fisher"]
CURVATURES: tuple[str, ...] = ("hessian", "gnh", "empirical-fisher")

# Examples x basis vectors processed at once when a dense Hessian is built.
DENSE_CHUNK_ELEMENTS = 16384


def check_curvature(curvature: object, owner: str) -> Curvature:
    if curvature in CURVATURES:
        return cast(Curvature, curvature)
    raise FidelityError(
        f"{owner}.curvature must be one of {', '.join(CURVATURES)}, got {curvature!r}"
    )


@dataclass(frozen=True)
class CurvatureOperator:
    """Products with the Hessian, Gauss-Newton matrix or empirical Fisher of J at theta_s (no
    damping)."""

    trained: TrainedProblem
    curvature: Curvature = "hessian"
    batch_size: int = 512
    _memo: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_params(self) -> int:
        return self.trained.n_params

    def batches(self, data: Examples | None = None):
        """``data`` (the training set by default) in consecutive batches of ``batch_size``."""
        data = data if data is not None else self.trained.problem.train
        for start in range(0, len(data), self.batch_size):
            yield Examples(
                data.x[start : start + self.batch_size], data.y[start : start + self.batch_size]
            )

    def batch_products(
        self, vectors: Tensor, batch: Examples, output_hessians: Tensor | None = None
    ) -> Tensor:
        """sum_{i in batch} C_i v for each row v of ``vectors`` ``[m, p]`` (no 1/N, no wd).

        ``output_hessians`` (Gauss-Newton only) may pass H_out for the batch if already known.
        """
        model, loss, theta = self.trained.model, self.trained.problem.loss, self.trained.theta
        if self.curvature == "hessian":

            def batch_loss(t: Tensor) -> Tensor:
                return loss_from_outputs(loss, model(t, batch.x), batch.y).sum()

            # Reverse-over-reverse: one forward and backward pass shared by every vector, then
            # a vmapped second backward (H is symmetric, so v^T H = (H v)^T). On CPU this is
            # about 25% faster than forward-over-reverse for the bundled networks.
            pullback = torch.func.vjp(torch.func.grad(batch_loss), theta)[1]
            return torch.func.vmap(pullback)(vectors)[0]
        if self.curvature == "empirical-fisher":
            gradients = self.example_gradients(batch)  # [b, p]
            return (vectors @ gradients.T) @ gradients

        vjp_fn = torch.func.vjp(lambda t: model(t, batch.x), theta)[1]
        if output_hessians is None:
            output_hessians = self._output_hessians(batch)  # [b, k, k]

        def gauss_newton_product(v: Tensor) -> Tensor:
            jv = torch.func.jvp(lambda t: model(t, batch.x), (theta,), (v,))[1]  # [b, k]
            return vjp_fn((output_hessians @ jv.unsqueeze(-1)).squeeze(-1))[0]

        return torch.func.vmap(gauss_newton_product)(vectors)

    def _output_hessians(self, batch: Examples) -> Tensor:
        """H_out at theta_s for each example of ``batch``, ``[b, k, k]``."""
        model, loss, theta = self.trained.model, self.trained.problem.loss, self.trained.theta
        factors = output_hessian_factor(loss, model(theta, batch.x).detach(), batch.y)
        return factors @ factors.transpose(1, 2)

    def _training_batch_output_hessians(self, number: int, batch: Examples) -> Tensor:
        # Products repeat over the same training batches (CG, Arnoldi): compute H_out once each.
        if number not in self._memo:
            self._memo[number] = self._output_hessians(batch)
        return self._memo[number]

    def matvec(self, vectors: Tensor) -> Tensor:
        """C v for each row of ``vectors`` ``[m, p]`` (or a single ``[p]`` vector)."""
        single = vectors.dim() == 1
        block = vectors.unsqueeze(0) if single else vectors
        total = torch.zeros_like(block)
        for number, batch in enumerate(self.batches()):
            known = (
                self._training_batch_output_hessians(number, batch)
                if self.curvature == "gnh"
                else None
            )
            total = total + self.batch_products(block, batch, known)
        problem = self.trained.problem
        result = total / problem.n_train + problem.weight_decay * block
        return result.squeeze(0) if single else result

    def minibatch_matvec(self, vectors: Tensor, batch: Examples) -> Tensor:
        """The curvature of the minibatch objective (1/|B|) sum_B L_i + (wd/2)||theta||^2."""
        products = self.batch_products(vectors, batch) / len(batch)
        return products + self.trained.problem.weight_decay * vectors

    def dense(self) -> Tensor:
        """The ``[p, p]`` matrix, accumulated over data batches (memory ~ p x batch x width)."""
        problem = self.trained.problem
        matrix = self.weighted_sum(None) / problem.n_train
        matrix.diagonal().add_(problem.weight_decay)
        return 0.5 * (matrix + matrix.T)

    def diagonal(self) -> Tensor:
        """diag(C) ``[p]``, weight decay included, exactly: the Gauss-Newton matrix's from the
        squared per-example factors R^T J, the empirical Fisher's from squared gradients (both
        one pass over the data, no p x p matrix), the Hessian's from the dense matrix."""
        problem = self.trained.problem
        if self.curvature == "hessian":
            return self.dense().diagonal().clone()
        total = self.trained.theta.new_zeros(self.n_params)
        for batch in self.batches():
            if self.curvature == "gnh":
                total += self.gauss_newton_factors(batch).pow(2).sum((0, 1))
            else:
                total += self.example_gradients(batch).pow(2).sum(0)
        return total / problem.n_train + problem.weight_decay

    def weighted_sum(self, weights: Tensor | None) -> Tensor:
        """``sum_i w_i C_i`` over the training set, ``[p, p]`` (no 1/N, no wd; every w_i = 1
        when ``weights`` is None). Examples of weight 0 are skipped, so the curvature of a small
        group costs what the group's size costs."""
        model, loss, theta = self.trained.model, self.trained.problem.loss, self.trained.theta
        train = self.trained.problem.train
        if weights is not None:
            if weights.shape != (len(train),):
                raise FidelityError(
                    f"curvature weights must have shape ({len(train)},), got {tuple(weights.shape)}"
                )
            kept = torch.nonzero(weights, as_tuple=True)[0].to(train.x.device)
            train = train.subset(kept)
            weights = weights.to(device=theta.device, dtype=theta.dtype)[kept]
        # The sum, its scaled copy and the symmetrised result are alive at once in dense().
        check_memory(
            dense_matrix_bytes(self.n_params, theta.element_size(), copies=3),
            f"the dense {self.curvature} of {self.trained.problem.name!r} "
            f"({self.n_params} parameters)",
            fix="use an iterative estimator (cg, lissa, arnoldi, ekfac) or a smaller model",
            device=theta.device,
        )
        total = torch.zeros(self.n_params, self.n_params, dtype=theta.dtype, device=theta.device)
        for start in range(0, len(train), self.batch_size):
            batch = Examples(
                train.x[start : start + self.batch_size], train.y[start : start + self.batch_size]
            )
            scale = None if weights is None else weights[start : start + len(batch)]
            if self.curvature == "hessian":

                def batch_loss(
                    t: Tensor, batch: Examples = batch, scale: Tensor | None = scale
                ) -> Tensor:
                    losses = loss_from_outputs(loss, model(t, batch.x), batch.y)
                    return losses.sum() if scale is None else (scale * losses).sum()

                # Reverse passes in chunks: memory ~ chunk x batch x width instead of p x ...
                chunk = max(1, DENSE_CHUNK_ELEMENTS // len(batch))
                total += torch.func.jacrev(torch.func.grad(batch_loss), chunk_size=chunk)(theta)
                continue
            if self.curvature == "empirical-fisher":
                rows = self.example_gradients(batch)
            else:
                rows = self.gauss_newton_factors(batch)  # [b, k, p]
            flat = rows.reshape(-1, self.n_params)
            if scale is not None:
                scaled = rows * scale.reshape(-1, *([1] * (rows.dim() - 1)))
                total += scaled.reshape(-1, self.n_params).T @ flat
            else:
                total += flat.T @ flat
        return total

    def example_gradients(self, batch: Examples) -> Tensor:
        """g_i = d L_i / d theta at theta_s for each example of ``batch``, ``[b, p]``."""
        trained = self.trained
        return per_example_grads(
            trained.model, trained.problem.loss, trained.theta, batch, len(batch)
        )

    def gauss_newton_factors(self, batch: Examples) -> Tensor:
        """R_i^T J_i for each example, ``[b, k, p]``: G_i = (R^T J)^T (R^T J)."""
        model, loss, theta = self.trained.model, self.trained.problem.loss, self.trained.theta

        def single_output(t: Tensor, x: Tensor) -> Tensor:
            return model(t, x.unsqueeze(0)).squeeze(0)

        jacobians = torch.func.vmap(torch.func.jacrev(single_output), in_dims=(None, 0))(
            theta, batch.x
        )  # [b, k, p]
        factors = output_hessian_factor(loss, model(theta, batch.x), batch.y)  # [b, k, k]
        return factors.transpose(1, 2) @ jacobians

    def gauss_newton_diagonal(self) -> Tensor:
        """diag(G) from per-example Gauss-Newton factors; nothing of size p x p is formed."""
        total = torch.zeros_like(self.trained.theta)
        for batch in self.batches():
            total = total + self.gauss_newton_factors(batch).pow(2).sum(dim=(0, 1))
        problem = self.trained.problem
        return total / problem.n_train + problem.weight_decay


@dataclass(frozen=True)
class ConjugateGradientResult:
    solution: Tensor  # [m, p]
    iterations: Tensor  # [m], steps taken per column
    negative_curvature: Tensor  # [m], columns stopped by a direction with p^T A p <= 0
    converged: Tensor  # [m], recursive relative residual <= tol


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    *,
    tol: float,
    max_iter: int,
    precondition: Callable[[Tensor], Tensor] | None = None,
    initial: Tensor | None = None,
) -> ConjugateGradientResult:
    """Solve A x = b for every row b of ``rhs`` ``[m, p]`` at once, each column with its own
    step sizes, until its relative residual ||r|| / ||b|| is at most ``tol`` (started from
    ``initial``, zero by default). A column that meets a direction of non-positive curvature
    stops at its last iterate and is flagged; it never steps along that direction."""
    precondition = precondition or (lambda r: r)
    x = torch.zeros_like(rhs) if initial is None else initial.clone()
    r = rhs.clone() if initial is None else rhs - apply(initial)
    z = precondition(r)
    direction = z.clone()
    rz = (r * z).sum(1)
    b_norm = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    active = (r.norm(dim=1) / b_norm) > tol
    iterations = torch.zeros(rhs.shape[0], dtype=torch.long)
    negative = torch.zeros(rhs.shape[0], dtype=torch.bool)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        ad = apply(direction)
        curvature = (direction * ad).sum(1)
        hit_negative = active & (curvature <= 0)
        negative |= hit_negative.cpu()
        active = active & ~hit_negative
        step = torch.where(active, rz / torch.where(active, curvature, 1.0), 0.0)
        x = x + step.unsqueeze(1) * direction
        r = r - step.unsqueeze(1) * ad
        z = precondition(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(active, rz_new / torch.where(active, rz, 1.0), 0.0)
        direction = torch.where(active.unsqueeze(1), z + beta.unsqueeze(1) * direction, 0)
        rz = rz_new
        iterations += active.cpu().long()
        active = active & ((r.norm(dim=1) / b_norm) > tol)
    converged = ((r.norm(dim=1) / b_norm) <= tol).cpu() & ~negative
    return ConjugateGradientResult(x, iterations, negative, converged)


def block_conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    *,
    tol: float,
    max_iter: int,
    precondition: Callable[[Tensor], Tensor] | None = None,
) -> ConjugateGradientResult:
    """Solve A x = b for every row b of ``rhs`` ``[m, p]`` by block conjugate gradients: one
    search space shared by all columns, so each step minimises every column's error over the
    Krylov space of all right-hand sides (O'Leary 1980), which takes far fewer steps than m
    separate CGs when the spectrum decays (influence's test gradients share the large
    curvature directions).

    The breakdown-free form (Ji and Li 2017): the search directions are orthonormalised and
    rank-truncated at every step (a column whose residual lies in the span of the others adds
    no direction), and columns at ``tol`` leave the block. Stops per column at relative
    residual ||r|| / ||b|| <= ``tol``; ``iterations`` counts the block steps each column took.
    When P^T A P is not positive definite (the span holds non-positive curvature, possible for
    the Hessian of a non-convex model without enough damping), the remaining columns are
    finished by per-column ``conjugate_gradient`` from where they are, which stops and flags a
    column at such a direction.
    """
    precondition = precondition or (lambda r: r)
    m = rhs.shape[0]
    x = torch.zeros_like(rhs)  # rows, like rhs
    r = rhs.clone()
    b_norm = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    active = (r.norm(dim=1) / b_norm) > tol
    iterations = torch.zeros(m, dtype=torch.long)
    directions = _orthonormal_rows(precondition(r[active]))  # [s, p]
    breakdown = False
    for _ in range(max_iter):
        if not bool(active.any()) or directions.shape[0] == 0:
            break
        products = apply(directions)  # A P, rows
        gram = directions @ products.T
        gram = 0.5 * (gram + gram.T)
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            breakdown = True
            break
        rows = torch.nonzero(active).flatten()
        step = torch.cholesky_solve(directions @ r[rows].T, factor)  # [s, a]
        x[rows] += step.T @ directions
        r[rows] -= step.T @ products
        iterations[active.cpu()] += 1
        active = active & ((r.norm(dim=1) / b_norm) > tol)
        if not bool(active.any()):
            break
        z = precondition(r[active])  # [a, p]
        beta = torch.cholesky_solve(products @ z.T, factor)  # [s, a]
        directions = _orthonormal_rows(z - beta.T @ directions)
    negative = torch.zeros(m, dtype=torch.bool)
    if breakdown and bool(active.any()):
        rows = torch.nonzero(active).flatten()
        rest = conjugate_gradient(
            apply,
            rhs[rows],
            tol=tol,
            max_iter=max_iter,
            precondition=precondition,
            initial=x[rows],
        )
        x[rows] = rest.solution
        iterations[rows.cpu()] += rest.iterations
        negative[rows.cpu()] = rest.negative_curvature
    converged = ((r.norm(dim=1) / b_norm) <= tol).cpu()
    if breakdown:
        converged = (((rhs - apply(x)).norm(dim=1) / b_norm) <= tol).cpu()
    return ConjugateGradientResult(x, iterations, negative, converged & ~negative)


def _orthonormal_rows(vectors: Tensor) -> Tensor:
    """An orthonormal basis (rows) of the span of the rows of ``vectors`` ``[a, p]``, without
    the directions whose singular values are below sqrt(eps) of the largest: a residual that
    is (nearly) a combination of the others differs from it only by rounding, which would be
    normalised into a search direction of noise; what such a cut drops is a tiny part of the
    residuals, found again in later steps."""
    if vectors.shape[0] == 0:
        return vectors
    _, singular, basis = torch.linalg.svd(vectors, full_matrices=False)
    cutoff = torch.finfo(vectors.dtype).eps ** 0.5 * singular[0]
    return basis[singular > cutoff]


@dataclass(frozen=True)
class GaussNewtonWoodbury:
    """(G + shift I)^{-1} by the Woodbury identity, for models with more parameters than
    training outputs (N k < p): with R the ``[N k, p]`` stack of per-example factors R_i^T J_i
    (G = R^T R / N + wd I), (R^T R / N + shift I)^{-1} = (I - R^T (N shift I + R R^T)^{-1} R)
    / shift, shift = wd + damping. Exact, and it costs N k per-example Jacobians and one
    Cholesky of an ``[N k, N k]`` matrix instead of anything of size p x p.

    ``subset`` restricts G to those parameter indices (the block of G for some layers)."""

    factors: Tensor  # [N k, p_s]
    cholesky: Tensor  # [N k, N k], of N shift I + R R^T
    shift: float
    subset: Tensor | None
    eigenvalues: Tensor  # of R R^T / N: G's eigenvalues above wd (the rest equal wd)

    def solve(self, vectors: Tensor) -> Tensor:
        """(G_s + damping I)^{-1} v for each row of ``vectors`` ``[m, p_s]``, computed in
        float64 whatever the model's dtype: the subtraction v - R^T (...) cancels most of v
        along the data directions, which float32 cannot afford."""
        wide = vectors.to(self.factors.dtype)
        projected = wide @ self.factors.T  # [m, N k]
        inner = torch.cholesky_solve(projected.T, self.cholesky).T
        return ((wide - inner @ self.factors) / self.shift).to(vectors.dtype)


def gauss_newton_woodbury(
    trained: TrainedProblem, damping: float, batch_size: int, subset: Tensor | None = None
) -> GaussNewtonWoodbury:
    """Build the Woodbury form of (G + (wd + damping) I)^{-1} at theta_s (see the class)."""
    problem = trained.problem
    shift = problem.weight_decay + damping
    if shift <= 0:
        raise FidelityError(
            "the Woodbury Gauss-Newton solve needs weight decay + damping > 0 (G itself is "
            "singular when the model has more parameters than training outputs)"
        )
    operator = CurvatureOperator(trained, "gnh", batch_size)
    pieces = []
    for batch in operator.batches():
        factors = operator.gauss_newton_factors(batch)
        factors = factors.reshape(-1, trained.n_params)
        pieces.append((factors if subset is None else factors[:, subset]).double())
    factors = torch.cat(pieces)
    gram = factors @ factors.T
    eigenvalues = torch.linalg.eigvalsh(gram) / problem.n_train
    gram.diagonal().add_(problem.n_train * shift)
    cholesky, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise FidelityError("the Woodbury Gauss-Newton system is not positive definite")
    return GaussNewtonWoodbury(factors, cholesky, shift, subset, eigenvalues)


def woodbury_pays(trained: TrainedProblem, n_params: int | None = None) -> bool:
    """Whether N k (training outputs) is below the number of parameters solved for."""
    outputs = trained.model(trained.theta, trained.problem.x_train[:1]).shape[-1]
    return trained.problem.n_train * outputs < (n_params or trained.n_params)


DENSE_LIMIT = 6000  # parameters up to which G is formed densely by the responses


def gauss_newton_factor(
    trained: TrainedProblem, damping: float, batch_size: int, owner: str
) -> Tensor:
    """Cholesky factor of the dense G + (wd + damping) I at theta_s (``owner`` names the stage
    in the error when it is not positive definite)."""
    matrix = CurvatureOperator(trained, "gnh", batch_size).dense()
    matrix.diagonal().add_(damping)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise FidelityError(f"{owner}: G + (wd + damping) I is not positive definite")
    return factor
