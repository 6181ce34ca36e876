"""The hypergradient of the learning-based strategy (Eq. 2–3 and Algorithm 1 of the paper).

The inner problem trains ``theta`` on ``L_tot(theta, alpha) = (1 - alpha) L_CLS(theta) + alpha L_MM(theta)``; the
outer problem chooses ``alpha`` to minimise ``L_CLS(theta*(alpha))``. At an inner optimum
``grad_theta L_tot = 0``; differentiating that identity in ``alpha`` (implicit function theorem) gives
``d theta*/d alpha = -H^{-1} (g_MM - g_CLS)`` with ``H`` the Hessian of ``L_tot`` in ``theta``, hence

    d L_CLS_outer(theta*(alpha)) / d alpha = -(g_MM - g_CLS)^T H^{-1} v,

where ``g_MM``, ``g_CLS`` are the gradients of the two losses on the inner (training) batch and ``v`` is the
gradient of ``L_CLS`` on the outer batch. ``g_MM - g_CLS`` is the mixed derivative ``d^2 L_tot / d alpha d theta``
of Eq. 3.

``H^{-1} v`` is approximated (:data:`APPROXIMATIONS`):

* ``identity``: ``H^{-1} ~ scale * I``, so the result is ``-scale * (g_MM - g_CLS)^T v`` — a one-step look-ahead,
  like first-order DARTS; no Hessian-vector product is needed.
* ``neumann``: truncated Neumann series ``scale * sum_{k=0..K} (I - scale H)^k v`` with K Hessian-vector products;
  it converges when ``0 < scale < 2 / lambda_max(H)`` and ``H`` is positive definite.
* ``cg``: K iterations of conjugate gradient on ``(H + damping I) x = v``.

Everything works on lists of tensors, one per parameter, so the model is never flattened into one vector.

Cost (bench/lb_overhead.py measures it): ``identity`` needs two plain backward passes (``v`` and ``g_MM - g_CLS``),
about one training step; every Hessian-vector product is a double backward, several steps each on a CNN, which is
why the default is ``identity`` and why Neumann's products are taken two at a time (:func:`neumann_bilinear`).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dmgl_cli.errors import DmglError

APPROXIMATIONS = ("identity", "neumann", "cg")

# CG stops once the residual norm falls below this fraction of ||v||; float32 cannot do much better anyway
_CG_RELATIVE_TOLERANCE = 1e-10

TensorList = list[Tensor]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    total = torch.zeros((), dtype=a[0].dtype, device=a[0].device)
    for x, y in zip(a, b, strict=True):
        total = total + (x * y).sum()
    return total


def _fill_unused(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> TensorList:
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
    return _fill_unused(products, params)


def inverse_hvp(
    hvp: Callable[[TensorList], TensorList],
    v: Sequence[Tensor],
    approx: str,
    terms: int,
    scale: float,
    damping: float,
) -> TensorList:
    """Approximate ``H^{-1} v`` given ``hvp(x) = H x``; ``approx`` is one of :data:`APPROXIMATIONS`.

    ``terms`` is the number of Neumann terms or CG iterations (ignored by ``identity``); ``scale`` is the step of
    ``identity`` and ``neumann`` (ignored by ``cg``); ``damping`` is added to the diagonal of ``H`` by ``neumann``
    and ``cg``, which keeps an indefinite or ill-conditioned Hessian invertible. CG stops early once the residual is
    negligible, or when it meets non-positive curvature (``H`` not positive definite), returning its iterate so far.
    """
    if approx not in APPROXIMATIONS:
        raise DmglError(f"unknown inverse-Hessian approximation '{approx}'; valid names: {', '.join(APPROXIMATIONS)}")
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

    solution = [torch.zeros_like(t) for t in v]
    residual = [t.clone() for t in v]
    direction = [t.clone() for t in v]
    residual_sq = _dot(residual, residual)
    stop_below = (_CG_RELATIVE_TOLERANCE**2) * residual_sq
    for _ in range(terms):
        if residual_sq <= stop_below or residual_sq == 0:
            break
        h_direction = damped_hvp(direction)
        curvature = _dot(direction, h_direction)
        if curvature <= 0:
            # negative curvature: H is not positive definite along this direction; CG's step would be meaningless
            break
        step = residual_sq / curvature
        solution = [x + step * d for x, d in zip(solution, direction, strict=True)]
        residual = [r - step * hd for r, hd in zip(residual, h_direction, strict=True)]
        new_residual_sq = _dot(residual, residual)
        direction = [r + (new_residual_sq / residual_sq) * d for r, d in zip(residual, direction, strict=True)]
        residual_sq = new_residual_sq
    return solution


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
    return [_fill_unused([None if g is None else g[k] for g in batched], params) for k in range(len(vectors))]


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
            [x - scale * (hx + damping * x) if damping else x - scale * hx for x, hx in zip(vector, product, strict=True)]
            for vector, product in zip(current, products, strict=True)
        ]
        if round_number < left_needed:
            left_powers.append(stepped[0])
        right_powers.append(stepped[-1])
    series = sum(_dot(left_powers[k // 2], right_powers[k - k // 2]) for k in range(terms + 1))
    return scale * series


def alpha_hypergradient(
    cls_loss_inner: Tensor,
    mm_loss_inner: Tensor,
    alpha: float | Tensor,
    cls_loss_outer: Tensor,
    params: Sequence[Tensor],
    approx: str,
    terms: int,
    scale: float,
    damping: float,
) -> float:
    """``d L_CLS_outer(theta*(alpha)) / d alpha = -(g_MM - g_CLS)^T H^{-1} v`` (see the module docstring).

    ``cls_loss_inner`` and ``mm_loss_inner`` are the two losses on the inner (training) batch, ``cls_loss_outer``
    the classification loss on the outer batch; all must still have their graphs to ``params``, the parameters
    that enter ``H``; their graphs are retained, so the caller may still backpropagate them. With ``identity`` the
    result is ``-scale * (g_MM - g_CLS)^T v``. The value is the derivative itself: gradient descent on alpha moves it
    by ``-lr * value``.

    Cost, in backward passes through the inner graph: ``g_MM - g_CLS`` is one plain backward of ``L_MM - L_CLS``
    (both gradients are never needed apart); ``neumann`` and ``cg`` add one backward that builds the graph of
    ``grad L_tot`` (double backward needs it) and then their Hessian-vector products — ``ceil(terms / 2)`` batched
    rounds for ``neumann`` (:func:`neumann_bilinear`), up to ``terms`` for ``cg``.
    """
    if approx not in APPROXIMATIONS:
        raise DmglError(f"unknown inverse-Hessian approximation '{approx}'; valid names: {', '.join(APPROXIMATIONS)}")
    params = list(params)
    alpha = float(alpha)
    # the outer loss may share its forward graph with the inner ones, so keep it for the gradients below
    v = _fill_unused(torch.autograd.grad(cls_loss_outer, params, retain_graph=True, allow_unused=True), params)
    mixed = _fill_unused(
        torch.autograd.grad(mm_loss_inner - cls_loss_inner, params, retain_graph=True, allow_unused=True), params
    )
    if approx == "identity":
        return float(-scale * _dot(mixed, v))
    total = (1 - alpha) * cls_loss_inner + alpha * mm_loss_inner
    g_tot = _fill_unused(
        torch.autograd.grad(total, params, create_graph=True, retain_graph=True, allow_unused=True), params
    )
    if approx == "neumann":
        value = neumann_bilinear(lambda vectors: hessian_vector_products(g_tot, params, vectors), mixed, v, terms,
                                 scale, damping)
        return float(-value)

    def hvp(vector: TensorList) -> TensorList:
        return hessian_vector_product(g_tot, params, vector)

    h_inv_v = inverse_hvp(hvp, v, approx, terms, scale, damping)
    return float(-_dot(mixed, h_inv_v))
