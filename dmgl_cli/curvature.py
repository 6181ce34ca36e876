"""Curvature on lists of tensors (one per parameter; the model is never flattened): Hessian-vector products by
double backward, and the solvers that :mod:`dmgl_cli.hypergradient` approximates ``H^{-1} v`` with: conjugate
gradient, the largest eigenvalue by power iteration, the truncated Neumann series (:func:`inverse_hvp`,
:func:`neumann_bilinear`). Pure tensor maths."""

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dmgl_cli.errors import DmglError
from dmgl_cli.strategies.settings import APPROXIMATIONS

# Power iterations of a fresh lambda_max estimate (scale=None); the estimate is a Rayleigh quotient, which converges
# quickly enough for a step size: a 10-20% underestimate of lambda_max still keeps 1/lambda within 2/lambda_max.
POWER_ITERATIONS = 20

# CG stops once the residual norm falls below this fraction of ||v||; float32 cannot do much better anyway
CG_RELATIVE_TOLERANCE = 1e-10

TensorList = list[Tensor]
# The mean over data-parallel ranks of gradient-shaped tensors (distributed.DistributedContext.average): every
# gradient made by autograd.grad here is one rank's share until it is reduced. The identity when not distributed.
Reduce = Callable[[Sequence[Tensor]], TensorList]


def unreduced(tensors: Sequence[Tensor]) -> TensorList:
    return list(tensors)


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    total = torch.zeros((), dtype=a[0].dtype, device=a[0].device)
    for x, y in zip(a, b, strict=True):
        total = total + (x * y).sum()
    return total


def fill_unused(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> TensorList:
    # a parameter that the loss does not reach has a zero gradient, not a missing one
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def hessian_vector_product(
    grads_with_graph: Sequence[Tensor], params: Sequence[Tensor], vector: Sequence[Tensor]
) -> TensorList:
    """``H @ vector`` by one double backward through ``grads_with_graph`` (gradients made with ``create_graph=True``).

    The graph is retained so that the product can be taken again for the next vector. Gradients that do not depend
    on the parameters (no graph) and parameters that the gradients do not reach contribute zeros.
    """
    params = list(params)
    connected = [i for i, g in enumerate(grads_with_graph) if g.requires_grad]
    if not connected:
        return [torch.zeros_like(p) for p in params]
    products = torch.autograd.grad(
        [grads_with_graph[i] for i in connected],
        params,
        grad_outputs=[vector[i].detach() for i in connected],
        retain_graph=True,
        allow_unused=True,
    )
    return fill_unused(products, params)


@dataclass
class ConjugateGradientResult:
    solution: TensorList
    iterations: int  # Hessian-vector products taken
    negative_curvature: bool  # stopped at a direction d with d^T H d <= 0
    relative_residual: float  # ||v - H x|| / ||v|| at the returned x (1.0 when it stopped at once)


def conjugate_gradient(
    hvp: Callable[[TensorList], TensorList],
    v: Sequence[Tensor],
    iterations: int,
    tolerance: float = CG_RELATIVE_TOLERANCE,
) -> ConjugateGradientResult:
    """Up to ``iterations`` steps of conjugate gradient on ``H x = v`` from ``x = 0``, in the dtype of ``v``.

    Stops early once ``||v - H x|| / ||v||`` is below ``tolerance``, or at the first direction of non-positive
    curvature (``H`` not positive definite there): CG's step along it would move towards a saddle, so the iterate so
    far is returned and the event is reported; the caller decides whether to use it (:func:`implicit_hypergradient`
    falls back past ``max_residual``).
    """
    solution = [torch.zeros_like(t) for t in v]
    residual = [t.clone() for t in v]
    direction = [t.clone() for t in v]
    residual_sq = dot(residual, residual)
    initial_sq = residual_sq
    stop_below = (tolerance**2) * residual_sq
    taken, negative = 0, False
    for _ in range(iterations):
        if residual_sq <= stop_below or residual_sq == 0:
            break
        h_direction = hvp(direction)
        taken += 1
        curvature = dot(direction, h_direction)
        if curvature <= 0:
            negative = True
            break
        step = residual_sq / curvature
        solution = [x + step * d for x, d in zip(solution, direction, strict=True)]
        residual = [r - step * hd for r, hd in zip(residual, h_direction, strict=True)]
        new_residual_sq = dot(residual, residual)
        direction = [r + (new_residual_sq / residual_sq) * d for r, d in zip(residual, direction, strict=True)]
        residual_sq = new_residual_sq
    relative = float((residual_sq / initial_sq).sqrt()) if initial_sq > 0 else 0.0
    return ConjugateGradientResult(solution, taken, negative, relative)


def largest_eigenvalue(
    hvp: Callable[[TensorList], TensorList], like: Sequence[Tensor], iterations: int = POWER_ITERATIONS, seed: int = 0
) -> float:
    """The eigenvalue of largest magnitude of ``H`` (given ``hvp(x) = H x``) by power iteration from a seeded random
    start; returns its magnitude, the bound that keeps Neumann's ``I - scale H`` a contraction on ``H``'s positive
    eigenvalues."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vector = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in like]
    norm = dot(vector, vector).sqrt()
    vector = [t / norm for t in vector]
    estimate = 0.0
    for _ in range(iterations):
        product = hvp(vector)
        estimate = float(dot(vector, product))  # Rayleigh quotient of the unit vector
        norm = dot(product, product).sqrt()
        if norm == 0:
            return 0.0
        vector = [t / norm for t in product]
    return abs(estimate)


def inverse_hvp(
    hvp: Callable[[TensorList], TensorList],
    v: Sequence[Tensor],
    approx: str,
    terms: int,
    scale: float,
    damping: float,
) -> TensorList:
    """Approximate ``(H + damping I)^{-1} v`` given ``hvp(x) = H x``; ``approx`` is one of :data:`APPROXIMATIONS`.

    ``terms`` is the number of Neumann terms or CG iterations (ignored by ``identity``); ``scale`` is the step of
    ``identity`` and ``neumann`` (ignored by ``cg``); ``damping`` is added to the diagonal of ``H`` by ``neumann``
    and ``cg``, which keeps an indefinite or ill-conditioned Hessian invertible. CG stops as
    :func:`conjugate_gradient` says.
    """
    if approx not in APPROXIMATIONS:
        raise DmglError(f"unknown inverse-Hessian approximation '{approx}'; valid names: {', '.join(APPROXIMATIONS)}")
    if approx == "ggn":
        raise ValueError("ggn linearises the network at its outputs: call ggn_hypergradient with them")
    v = [t.detach() for t in v]
    if approx == "identity":
        return [scale * t for t in v]

    def damped_hvp(x: TensorList) -> TensorList:
        hx = hvp(x)
        return [h + damping * t for h, t in zip(hx, x, strict=True)] if damping else hx

    if approx == "neumann":
        power_term = list(v)
        series_sum = [t.clone() for t in v]
        for _ in range(terms):
            power_term = [p - scale * hp for p, hp in zip(power_term, damped_hvp(power_term), strict=True)]
            series_sum = [s + p for s, p in zip(series_sum, power_term, strict=True)]
        return [scale * s for s in series_sum]
    return conjugate_gradient(damped_hvp, v, terms).solution


def hessian_vector_products(
    grads_with_graph: Sequence[Tensor], params: Sequence[Tensor], vectors: Sequence[Sequence[Tensor]]
) -> list[TensorList]:
    """``[H @ x for x in vectors]`` in one batched double backward (``is_grads_batched``, i.e. ``torch.func.vmap``
    over the backward pass), which keeps the device busier than one product after another.

    Falls back to one product at a time when the batched backward is not available for an operator in the graph.
    """
    vectors = [list(x) for x in vectors]
    if len(vectors) == 1:
        return [hessian_vector_product(grads_with_graph, params, vectors[0])]
    params = list(params)
    connected = [i for i, g in enumerate(grads_with_graph) if g.requires_grad]
    if not connected:
        return [[torch.zeros_like(p) for p in params] for _ in vectors]
    try:
        batched = torch.autograd.grad(
            [grads_with_graph[i] for i in connected],
            params,
            grad_outputs=[torch.stack([x[i].detach() for x in vectors]) for i in connected],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except (RuntimeError, NotImplementedError):
        # an operator without a batching rule for its double backward: one product per vector gives the same values
        return [hessian_vector_product(grads_with_graph, params, x) for x in vectors]
    return [fill_unused([None if g is None else g[k] for g in batched], params) for k in range(len(vectors))]


def neumann_bilinear(
    hvps: Callable[[list[TensorList]], list[TensorList]],
    left: Sequence[Tensor],
    right: Sequence[Tensor],
    terms: int,
    scale: float,
    damping: float,
) -> Tensor:
    """``left^T (scale * sum_{k=0..terms} M^k) right`` with ``M = I - scale (H + damping I)``: the Neumann
    approximation of ``left^T H^{-1} right`` without forming ``H^{-1} right``.

    ``M`` is symmetric, so ``left^T M^k right = (M^a left)^T (M^b right)`` for any ``a + b = k``: two chains of
    powers, one from each side, reach ``terms`` with ``ceil(terms / 2)`` rounds of products instead of ``terms``, and
    each round's two products are taken together by ``hvps`` (a batched Hessian-vector product). The value equals
    ``left^T inverse_hvp(..., "neumann", ...)`` up to rounding.
    """
    left_powers = [[t.detach() for t in left]]
    right_powers = [[t.detach() for t in right]]
    left_needed, right_needed = terms // 2, terms - terms // 2
    for round_number in range(right_needed):
        current = ([left_powers[-1]] if round_number < left_needed else []) + [right_powers[-1]]
        products = hvps(current)
        stepped = [
            [
                x - scale * (hx + damping * x) if damping else x - scale * hx
                for x, hx in zip(vector, product, strict=True)
            ]
            for vector, product in zip(current, products, strict=True)
        ]
        if round_number < left_needed:
            left_powers.append(stepped[0])
        right_powers.append(stepped[-1])
    series = functools.reduce(
        operator.add, (dot(left_powers[k // 2], right_powers[k - k // 2]) for k in range(terms + 1))
    )
    return scale * series
