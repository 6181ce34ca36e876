"""The hypergradient of the learning-based strategy (Eq. 2-3 and Algorithm 1 of the paper).

The inner problem trains ``theta`` on ``L_in(theta, alpha) = (1 - alpha) L_CLS(theta) + alpha L_MM(theta) +
R(theta)``, where ``R`` is the optimiser's coupled weight decay ``sum_i wd_i / 2 * ||theta_i||^2`` (SGD's and Adam's
``weight_decay`` add ``wd * theta`` to the gradient, so they minimise exactly this). The outer problem chooses
``alpha`` to minimise ``L_CLS(theta*(alpha))`` on outer data. At an inner optimum ``grad_theta L_in = 0``;
differentiating that identity in ``alpha`` (implicit function theorem) gives ``d theta*/d alpha = -H^{-1} (g_MM -
g_CLS)`` with ``H = grad^2 L_in`` (the loss Hessian plus ``diag(wd)``), hence

    d L_CLS_outer(theta*(alpha)) / d alpha = -(g_MM - g_CLS)^T H^{-1} v,                        (Eq. 3)

where ``g_MM``, ``g_CLS`` are the gradients of the two losses on the inner (training) batch and ``v`` the gradient
of ``L_CLS`` on the outer batch. ``g_MM - g_CLS`` is the mixed derivative ``d^2 L_in / d alpha d theta``; ``R`` does
not depend on alpha, so weight decay enters ``H`` only. Decoupled decay (AdamW) shrinks the weights outside the
gradient and is the minimiser of no objective, so it has no term in ``H``: with ``optim.name=adamw`` the weight
decay passed here is 0 (:func:`coupled_weight_decay`), and ``damping`` is the only regulariser of ``H``.

``H^{-1} v`` is approximated (:data:`APPROXIMATIONS`):

* ``identity``: ``H^{-1} ~ scale * I``, so the result is ``-scale * (g_MM - g_CLS)^T v``. This is **not** Eq. 3's
  inverse Hessian: it is the first-order, one-step look-ahead hypergradient (first-order DARTS): one SGD step of size
  ``scale`` moves ``theta`` by ``-scale * (g_MM - g_CLS)`` per unit of alpha, and ``v`` says what that does to the
  outer loss. Its sign is Eq. 3's only where ``H`` is close to a multiple of the identity; its magnitude carries
  ``scale`` and no curvature. No Hessian-vector product is needed.
* ``neumann``: the truncated Neumann series ``scale * sum_{k=0..K} (I - scale H)^k v`` with K Hessian-vector
  products; it converges to ``H^{-1} v`` when ``H`` is positive definite and ``0 < scale < 2 / lambda_max(H)``, at
  the rate ``(1 - scale * lambda_min)^K``. With ``scale=None`` the caller passes ``lambda_max`` (estimated by
  :func:`~dmgl_cli.curvature.largest_eigenvalue`) and the scale is ``1 / lambda_max``. With a small fixed scale and few terms the series
  is ~``(K + 1) * scale * v``, i.e. ``identity`` again.
* ``cg``: K iterations of conjugate gradient on ``(H + damping I) x = v`` (weight decay already in ``H``). CG is the
  curvature-correct choice: exact in ``dim(theta)`` iterations on a positive definite ``H``. On a real network ``H``
  is indefinite; when CG meets a direction of non-positive curvature it stops there and reports it
  (:class:`Hypergradient`); with ``max_residual`` a solve that stopped so, or whose residual stays above it, is
  replaced by identity's value and flagged ``fallback``, which the trainer logs.
* ``ggn``: CG on the generalised Gauss-Newton matrix ``J^T H_out J + diag(wd)`` with Levenberg-Marquardt damping
  (:func:`ggn_hypergradient`): positive semi-definite for the cross-entropy and InfoNCE, so the solve is well posed
  where ``H``'s is not.

Everything works on lists of tensors, one per parameter, so the model is never flattened into one vector.

Cost (``bench/lb_overhead.py`` and ``bench/lb_fidelity.py`` measure it): ``identity`` needs two plain backward
passes (``v`` and ``g_MM - g_CLS``), about one training step; every Hessian-vector product is a double backward,
several steps each on a CNN; Neumann's products are taken two at a time (:func:`~dmgl_cli.curvature.neumann_bilinear`).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dmgl_cli.curvature import (
    CG_RELATIVE_TOLERANCE,
    POWER_ITERATIONS,
    ConjugateGradientResult,
    Reduce,
    TensorList,
    conjugate_gradient,
    dot,
    fill_unused,
    hessian_vector_product,
    hessian_vector_products,
    largest_eigenvalue,
    neumann_bilinear,
    unreduced,
)
from dmgl_cli.errors import DmglError
from dmgl_cli.strategies.settings import APPROXIMATIONS


def coupled_weight_decay(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[float]:
    """The L2 coefficient the optimiser adds to each of ``params``' gradients: its group's ``weight_decay`` for SGD,
    Adam and the like (coupled decay, part of the inner objective), 0 for AdamW (decoupled decay, part of none).
    A parameter the optimiser does not hold gets 0."""
    if isinstance(optimizer, torch.optim.AdamW):
        return [0.0 for _ in params]
    decay = {id(p): float(group.get("weight_decay", 0.0)) for group in optimizer.param_groups for p in group["params"]}
    return [decay.get(id(p), 0.0) for p in params]


@dataclass
class Hypergradient:
    """One evaluation of Eq. 3: the value and what it cost and met."""

    value: float  # d L_CLS_outer / d alpha; gradient descent moves alpha by -lr * value
    hessian_products: int = 0  # Hessian-vector products taken (power iterations included)
    negative_curvature: bool = False  # CG stopped at a direction of non-positive curvature
    relative_residual: float | None = None  # CG: ||v - H x|| / ||v||
    largest_eigenvalue: float | None = None  # neumann with scale=None, ggn: the lambda_max it used
    # cg / ggn: the solve was not used (negative curvature, or a residual above max_residual); value is identity's
    fallback: bool = False
    snr: float | None = None  # epoch / average estimators: |value| over its standard error across groups of steps
    samples: int = 0  # epoch / average estimators: steps whose g_MM - g_CLS entered the value


def mixed_gradient(
    cls_loss_inner: Tensor, mm_loss_inner: Tensor, params: Sequence[Tensor], reduce: Reduce = unreduced
) -> TensorList:
    """``g_MM - g_CLS`` on the inner batch (one plain backward of ``L_MM - L_CLS``; the graph is kept for the
    caller's own backward), averaged over data-parallel ranks by ``reduce``."""
    params = list(params)
    grads = torch.autograd.grad(mm_loss_inner - cls_loss_inner, params, retain_graph=True, allow_unused=True)
    return reduce([g.detach() for g in fill_unused(grads, params)])


def identity_hypergradient(
    mixed: Sequence[Tensor],
    cls_loss_outer: Tensor,
    params: Sequence[Tensor],
    scale: float,
    reduce: Reduce = unreduced,
) -> float:
    """``-scale * (g_MM - g_CLS)^T v`` with ``v`` the gradient of the outer loss, whose graph is freed as ``v`` is
    taken: :func:`implicit_hypergradient` with ``approx=identity``, split so that the caller can run the outer forward
    after its own backward has freed the inner graph (the two graphs never coexist). ``mixed`` is already reduced;
    ``v`` is reduced here."""
    params = list(params)
    v = reduce(fill_unused(torch.autograd.grad(cls_loss_outer, params, allow_unused=True), params))
    return float(-scale * dot(mixed, v))


def implicit_hypergradient(
    cls_loss_inner: Tensor,
    mm_loss_inner: Tensor,
    alpha: float | Tensor,
    cls_loss_outer: Tensor,
    params: Sequence[Tensor],
    approx: str,
    terms: int,
    scale: float | None,
    damping: float,
    weight_decay: float | Sequence[float] = 0.0,
    largest_eigenvalue_estimate: float | None = None,
    power_iterations: int = POWER_ITERATIONS,
    seed: int = 0,
    outer_shares_graph: bool = True,
    reduce: Reduce | None = None,
    tolerance: float = CG_RELATIVE_TOLERANCE,
    max_residual: float | None = None,
    fallback_scale: float | None = None,
) -> Hypergradient:
    """``d L_CLS_outer(theta*(alpha)) / d alpha = -(g_MM - g_CLS)^T H^{-1} v`` (see the module docstring).

    ``cg`` stops at ``tolerance``; with ``max_residual`` set, a CG solve that met negative curvature or whose
    relative residual is above it is not used: the result is identity's value at ``fallback_scale`` (the look-ahead
    step), flagged ``fallback``. The truncated iterate is never returned unflagged.

    ``cls_loss_inner`` and ``mm_loss_inner`` are the two losses on the inner (training) batch, ``cls_loss_outer``
    the classification loss on the outer batch; all must still have their graphs to ``params``, the parameters
    that enter ``H``; their graphs are retained, so the caller may still backpropagate them. ``weight_decay`` is the
    optimiser's coupled L2 coefficient, one for all or one per parameter (:func:`coupled_weight_decay`); it is added
    to every Hessian-vector product. ``scale=None`` (``neumann`` only) uses ``1 / lambda_max`` of ``H + damping I``
    from ``largest_eigenvalue_estimate``, or from a fresh :func:`largest_eigenvalue` of ``power_iterations`` products
    when none is given. With ``identity`` the result is ``-scale * (g_MM - g_CLS)^T v``. ``reduce`` (data-parallel
    training) averages ``v``, ``g_MM - g_CLS`` and every Hessian-vector product over the ranks, so that every rank
    takes the same steps on the same vectors and returns the same value; products are then taken one at a time.

    Cost, in backward passes through the inner graph: ``g_MM - g_CLS`` is one plain backward of ``L_MM - L_CLS``;
    ``neumann`` and ``cg`` add one backward that builds the graph of ``grad L_in`` and then their Hessian-vector
    products: ``ceil(terms / 2)`` batched rounds for ``neumann`` (:func:`neumann_bilinear`), up to ``terms`` for
    ``cg``.
    """
    if approx not in APPROXIMATIONS:
        raise DmglError(f"unknown inverse-Hessian approximation '{approx}'; valid names: {', '.join(APPROXIMATIONS)}")
    if approx == "ggn":
        raise ValueError("ggn linearises the network at its outputs: call ggn_hypergradient with them")
    if scale is None and approx == "identity":
        raise ValueError("identity needs a scale (its look-ahead step); scale=None is for neumann (and unused by cg)")
    params = list(params)
    decay = [float(weight_decay)] * len(params) if isinstance(weight_decay, (int, float)) else list(weight_decay)
    if len(decay) != len(params):
        raise ValueError(f"weight_decay has {len(decay)} entries for {len(params)} parameters")
    alpha = float(alpha)
    # The outer loss may share its forward graph with the inner ones (keep it then); the trainer's does not, and
    # frees it here so that it does not stay alive through the Hessian-vector products.
    average = reduce or unreduced
    v = average(
        fill_unused(
            torch.autograd.grad(cls_loss_outer, params, retain_graph=outer_shares_graph, allow_unused=True), params
        )
    )
    mixed = average(
        fill_unused(
            torch.autograd.grad(mm_loss_inner - cls_loss_inner, params, retain_graph=True, allow_unused=True), params
        )
    )
    if approx == "identity":
        assert scale is not None  # refused above
        return Hypergradient(float(-scale * dot(mixed, v)))
    total = (1 - alpha) * cls_loss_inner + alpha * mm_loss_inner
    g_tot = fill_unused(
        torch.autograd.grad(total, params, create_graph=True, retain_graph=True, allow_unused=True), params
    )
    products = 0

    def with_decay(vector: TensorList, product: TensorList) -> TensorList:
        return [h + (wd + damping) * x if wd + damping else h for h, x, wd in zip(product, vector, decay, strict=True)]

    def hvp(vector: TensorList) -> TensorList:
        nonlocal products
        products += 1
        return with_decay(vector, average(hessian_vector_product(g_tot, params, vector)))

    def hvps(vectors: list[TensorList]) -> list[TensorList]:
        nonlocal products
        products += len(vectors)
        if reduce is None:
            raw = hessian_vector_products(g_tot, params, vectors)
        else:  # a batched (vmapped) backward cannot run the all-gather's collective backward
            raw = [average(hessian_vector_product(g_tot, params, vector)) for vector in vectors]
        return [with_decay(vector, product) for vector, product in zip(vectors, raw, strict=True)]

    if approx == "neumann":
        eigenvalue = None
        if scale is None:
            eigenvalue = largest_eigenvalue_estimate
            if eigenvalue is None:
                eigenvalue = largest_eigenvalue(hvp, v, power_iterations, seed)
            if not eigenvalue > 0 or not math.isfinite(eigenvalue):
                return Hypergradient(0.0, products, largest_eigenvalue=eigenvalue)
            scale = 1.0 / eigenvalue
        # damping and weight decay are inside hvps, so the series is taken with damping 0 here
        value = neumann_bilinear(hvps, mixed, v, terms, scale, 0.0)
        return Hypergradient(float(-value), products, largest_eigenvalue=eigenvalue)
    result = conjugate_gradient(hvp, [t.detach() for t in v], terms, tolerance)
    return _solved(mixed, v, result, products, max_residual, fallback_scale)


def _solved(
    mixed: TensorList,
    v: TensorList,
    result: ConjugateGradientResult,
    products: int,
    max_residual: float | None,
    fallback_scale: float | None,
    largest_eigenvalue: float | None = None,
) -> Hypergradient:
    """``-(g_MM - g_CLS)^T x`` from a CG solve ``x``, or identity's value when the solve is not to be trusted."""
    untrusted = max_residual is not None and (result.negative_curvature or not result.relative_residual <= max_residual)
    if untrusted:
        if fallback_scale is None:
            raise ValueError("max_residual needs fallback_scale (the identity step used in place of a failed solve)")
        value = float(-fallback_scale * dot(mixed, v))
    else:
        value = float(-dot(mixed, result.solution))
    return Hypergradient(
        value, products, result.negative_curvature, result.relative_residual, largest_eigenvalue, fallback=untrusted
    )


def ggn_hypergradient(
    outputs: Sequence[Tensor],
    convex_loss: Callable[[list[Tensor]], Tensor],
    mixed: Sequence[Tensor],
    cls_loss_outer: Tensor,
    params: Sequence[Tensor],
    terms: int,
    damping: float,
    relative_damping: float,
    weight_decay: float | Sequence[float] = 0.0,
    tolerance: float = 1e-6,
    max_residual: float | None = None,
    fallback_scale: float | None = None,
    largest_eigenvalue_estimate: float | None = None,
    power_iterations: int = 10,
    seed: int = 0,
) -> Hypergradient:
    """Eq. 3 with the generalised Gauss-Newton matrix in place of ``H``: ``-(g_MM - g_CLS)^T (G + mu I)^{-1} v``.

    The network is linearised up to ``outputs`` (logits on which the inner loss is convex: the fused logits of
    the cross-entropy, InfoNCE's similarity logits), ``G = J^T H_out J + diag(wd)`` with ``H_out`` the Hessian of
    ``convex_loss`` in the outputs, positive semi-definite for a convex loss. So ``G`` is positive definite once
    damped, and CG converges, where ``H`` of a real network is indefinite and CG stops at its negative curvature
    (bench/lb_replay.py --section curvature). ``mu = damping + relative_damping * lambda_max(G)``
    (Levenberg-Marquardt; lambda_max by ``power_iterations`` of power iteration unless
    ``largest_eigenvalue_estimate`` is given). ``convex_loss`` maps detached copies of ``outputs`` to the inner loss
    (without weight decay); ``mixed`` is ``g_MM - g_CLS`` on the same batch. One product costs two backward passes
    through the forward graph (``J v`` by the double-backward trick, then ``J^T``); the graph of ``J^T u`` is built
    once. Runs in the outputs' dtype: the caller runs the forward in fp32 (the trainer does under autocast).
    """
    params = list(params)
    outputs = list(outputs)
    decay = [float(weight_decay)] * len(params) if isinstance(weight_decay, (int, float)) else list(weight_decay)
    v = fill_unused(torch.autograd.grad(cls_loss_outer, params, allow_unused=True), params)
    mixed = [t.detach() for t in mixed]
    dummies = [torch.zeros_like(y, requires_grad=True) for y in outputs]
    # J^T u as a function of u: its graph is built once; differentiating it in u gives J v for any v
    transposed = fill_unused(
        torch.autograd.grad(outputs, params, grad_outputs=dummies, create_graph=True, allow_unused=True), params
    )
    connected = [i for i, t in enumerate(transposed) if t.requires_grad]
    detached = [y.detach().requires_grad_(True) for y in outputs]
    output_grads = torch.autograd.grad(convex_loss(detached), detached, create_graph=True)
    products = 0

    def ggn(vector: TensorList) -> TensorList:
        nonlocal products
        products += 1
        jv = torch.autograd.grad(
            [transposed[i] for i in connected],
            dummies,
            grad_outputs=[vector[i] for i in connected],
            retain_graph=True,
            allow_unused=True,
        )
        jv = [torch.zeros_like(y) if t is None else t for t, y in zip(jv, outputs, strict=True)]
        curvature = torch.autograd.grad(output_grads, detached, grad_outputs=jv, retain_graph=True)
        back = fill_unused(
            torch.autograd.grad(outputs, params, grad_outputs=list(curvature), retain_graph=True, allow_unused=True),
            params,
        )
        return [b + wd * x if wd else b for b, x, wd in zip(back, vector, decay, strict=True)]

    eigenvalue = largest_eigenvalue_estimate
    if eigenvalue is None and relative_damping > 0:
        eigenvalue = largest_eigenvalue(ggn, v, power_iterations, seed)
    mu = damping + relative_damping * (eigenvalue or 0.0)

    def damped(vector: TensorList) -> TensorList:
        return [g + mu * x for g, x in zip(ggn(vector), vector, strict=True)] if mu else ggn(vector)

    result = conjugate_gradient(damped, [t.detach() for t in v], terms, tolerance)
    return _solved(mixed, v, result, products, max_residual, fallback_scale, eigenvalue)


def alpha_hypergradient(
    cls_loss_inner: Tensor,
    mm_loss_inner: Tensor,
    alpha: float | Tensor,
    cls_loss_outer: Tensor,
    params: Sequence[Tensor],
    approx: str,
    terms: int,
    scale: float | None,
    damping: float,
    weight_decay: float | Sequence[float] = 0.0,
) -> float:
    """The value of :func:`implicit_hypergradient` alone."""
    return implicit_hypergradient(
        cls_loss_inner, mm_loss_inner, alpha, cls_loss_outer, params, approx, terms, scale, damping, weight_decay
    ).value


def first_tensor_hessian_gradient_mean(
    cls_loss: Tensor, matching_loss: Tensor, alpha: float, params: Sequence[Tensor], reduce: Reduce = unreduced
) -> float:
    """The authors' released alpha gradient (``getAlpha_Learnable`` of ``Crema_epoch_learnable.py`` in
    njustkmg/NeurIPS24-LFM): with ``L = (1 - alpha) L_CLS + alpha L_MM`` on one batch, the mean over the entries of
    the *first* parameter tensor of ``H g_CLS``, where ``H`` is the Hessian of ``L`` in all ``params`` and
    ``g_CLS = grad L_CLS``, both on that same batch. No inverse, no ``g_MM - g_CLS`` and no weight decay: this is not
    Eq. 3, and ``dmgl-official`` uses it because the released code does."""
    params = list(params)
    total = (1 - alpha) * cls_loss + alpha * matching_loss
    g_total = fill_unused(torch.autograd.grad(total, params, create_graph=True, allow_unused=True), params)
    g_cls = reduce(fill_unused(torch.autograd.grad(cls_loss, params, retain_graph=True, allow_unused=True), params))
    product = reduce(hessian_vector_product(g_total, params, g_cls))
    return float(product[0].mean())
