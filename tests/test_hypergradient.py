"""The hypergradient against quantities formed exactly: a Hessian small enough to invert, and closed forms."""

import pytest
import torch
import torch.nn.functional as F

from dmgl_cli.curvature import conjugate_gradient, hessian_vector_product, inverse_hvp, largest_eigenvalue
from dmgl_cli.errors import DmglError
from dmgl_cli.hypergradient import (
    APPROXIMATIONS,
    alpha_hypergradient,
    coupled_weight_decay,
    first_tensor_hessian_gradient_mean,
    implicit_hypergradient,
)

FEATURES, CLASSES = 4, 3
WEIGHT_DECAY = 0.05
ALPHA = 0.4


def _make_problem():
    generator = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x_inner, x_outer = randn(40, FEATURES), randn(30, FEATURES)
    true_weight = randn(CLASSES, FEATURES)
    y_inner = (x_inner @ true_weight.T + 0.8 * randn(40, CLASSES)).argmax(1)
    y_outer = (x_outer @ true_weight.T + 0.8 * randn(30, CLASSES)).argmax(1)
    # the "matching" loss pulls the logits towards targets that disagree with the labels, so alpha matters
    matching_targets = randn(40, CLASSES)
    return x_inner, y_inner, x_outer, y_outer, matching_targets


X_INNER, Y_INNER, X_OUTER, Y_OUTER, MATCHING_TARGETS = _make_problem()
N_PARAMS = CLASSES * FEATURES + CLASSES  # 15: multinomial logistic regression, weight and bias


def _unflatten(theta):
    return theta[: CLASSES * FEATURES].reshape(CLASSES, FEATURES), theta[CLASSES * FEATURES :]


def _losses(weight, bias):
    """(L_CLS inner, L_MM inner, L_CLS outer); the L2 term keeps the Hessian of L_tot positive definite."""
    l2 = 0.5 * WEIGHT_DECAY * (weight.pow(2).sum() + bias.pow(2).sum())
    logits_inner = X_INNER @ weight.T + bias
    cls_inner = F.cross_entropy(logits_inner, Y_INNER) + l2
    mm_inner = 0.5 * (logits_inner - MATCHING_TARGETS).pow(2).sum(1).mean() + l2
    cls_outer = F.cross_entropy(X_OUTER @ weight.T + bias, Y_OUTER)
    return cls_inner, mm_inner, cls_outer


def _total(theta, alpha):
    cls_inner, mm_inner, _ = _losses(*_unflatten(theta))
    return (1 - alpha) * cls_inner + alpha * mm_inner


def _flat_grad(index, theta):
    theta = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_losses(*_unflatten(theta))[index], theta)
    return grad


def _hessian(theta, alpha):
    return torch.autograd.functional.hessian(lambda t: _total(t, alpha), theta.detach())


def _inner_optimum(alpha):
    """theta*(alpha) by Newton's method on the strictly convex L_tot, to machine precision."""
    theta = torch.zeros(N_PARAMS, dtype=torch.float64)
    for _ in range(30):
        grad = (1 - alpha) * _flat_grad(0, theta) + alpha * _flat_grad(1, theta)
        if grad.norm() < 1e-14:
            break
        theta = theta - torch.linalg.solve(_hessian(theta, alpha), grad)
    return theta


def _exact_hypergradient(theta, alpha, damping=0.0):
    g_cls, g_mm, v = (_flat_grad(i, theta) for i in range(3))
    hessian = _hessian(theta, alpha) + damping * torch.eye(N_PARAMS, dtype=torch.float64)
    return float(-(g_mm - g_cls) @ torch.linalg.solve(hessian, v))


THETA_STAR = _inner_optimum(ALPHA)
EXACT = _exact_hypergradient(THETA_STAR, ALPHA)
EIGENVALUES = torch.linalg.eigvalsh(_hessian(THETA_STAR, ALPHA))


def _hypergradient(approx, terms, scale, damping, theta=THETA_STAR, extra_params=()):
    weight, bias = (t.clone().requires_grad_(True) for t in _unflatten(theta.detach()))
    cls_inner, mm_inner, cls_outer = _losses(weight, bias)
    return alpha_hypergradient(
        cls_inner, mm_inner, ALPHA, cls_outer, [weight, bias, *extra_params], approx, terms, scale, damping
    )


def test_problem_is_well_posed():
    assert EIGENVALUES.min() >= WEIGHT_DECAY * 0.999  # positive definite
    residual = (1 - ALPHA) * _flat_grad(0, THETA_STAR) + ALPHA * _flat_grad(1, THETA_STAR)
    assert residual.norm() < 1e-10  # THETA_STAR really is the inner optimum
    assert abs(EXACT) > 1e-2  # far from zero, so relative errors and signs mean something


def test_implicit_gradient_equals_finite_difference_of_the_bilevel_objective():
    # the formula is the derivative of alpha -> L_CLS_outer(theta*(alpha)), checked without the formula
    step = 1e-4
    outer = [_losses(*_unflatten(_inner_optimum(ALPHA + s)))[2].item() for s in (step, -step)]
    finite_difference = (outer[0] - outer[1]) / (2 * step)
    assert EXACT == pytest.approx(finite_difference, rel=1e-6)


def test_hessian_vector_product_matches_exact_hessian():
    weight, bias = (t.clone().requires_grad_(True) for t in _unflatten(THETA_STAR))
    cls_inner, mm_inner, _ = _losses(weight, bias)
    total = (1 - ALPHA) * cls_inner + ALPHA * mm_inner
    grads = list(torch.autograd.grad(total, [weight, bias], create_graph=True))
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):  # the graph is retained, so a second product works
        vector = torch.randn(N_PARAMS, generator=generator, dtype=torch.float64)
        product = hessian_vector_product(grads, [weight, bias], list(_unflatten(vector)))
        assert product[0].shape == weight.shape and product[1].shape == bias.shape
        flat = torch.cat([product[0].reshape(-1), product[1]])
        torch.testing.assert_close(flat, _hessian(THETA_STAR, ALPHA) @ vector, rtol=1e-10, atol=1e-12)


def test_hessian_vector_product_of_unreached_parameter_is_zero():
    theta = torch.tensor([1.5], requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    (grad,) = torch.autograd.grad(theta.pow(3).sum(), [theta], create_graph=True)
    product = hessian_vector_product([grad, torch.zeros(2)], [theta, unused], [torch.tensor([2.0]), torch.ones(2)])
    assert product[0].item() == pytest.approx(6 * 1.5 * 2.0)
    assert torch.equal(product[1], torch.zeros(2))


def test_neumann_approaches_the_exact_implicit_gradient():
    scale = 0.9 / EIGENVALUES.max().item()
    errors = {terms: abs(_hypergradient("neumann", terms, scale, 0.0) - EXACT) / abs(EXACT) for terms in (2, 10, 60)}
    assert errors[60] < 1e-3
    assert errors[2] > errors[10] > errors[60]  # more terms, closer
    assert errors[2] > 1e-2  # the comparison is not trivially satisfied by a short series


def test_conjugate_gradient_reaches_the_exact_implicit_gradient():
    assert _hypergradient("cg", N_PARAMS, 1.0, 0.0) == pytest.approx(EXACT, rel=1e-3)
    assert _hypergradient("cg", 1, 1.0, 0.0) != pytest.approx(EXACT, rel=1e-3)  # one iteration is not enough


def test_damping_solves_the_damped_system():
    damped_exact = _exact_hypergradient(THETA_STAR, ALPHA, damping=0.5)
    assert _hypergradient("cg", N_PARAMS, 1.0, 0.5) == pytest.approx(damped_exact, rel=1e-6)
    scale = 0.9 / (EIGENVALUES.max().item() + 0.5)
    assert _hypergradient("neumann", 80, scale, 0.5) == pytest.approx(damped_exact, rel=1e-3)
    assert abs(damped_exact - EXACT) > 1e-2 * abs(EXACT)  # damping really changes the answer


def test_identity_is_scaled_first_order_term_with_the_exact_sign():
    g_cls, g_mm, v = (_flat_grad(i, THETA_STAR) for i in range(3))
    first_order = float(-(g_mm - g_cls) @ v)
    identity = _hypergradient("identity", 0, 0.3, 0.0)
    assert identity == pytest.approx(0.3 * first_order, rel=1e-10)
    assert identity * EXACT > 0


def test_parameters_without_gradient_count_as_zeros():
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)
    for approx, terms in (("cg", N_PARAMS), ("neumann", 50), ("identity", 0)):
        with_unused = _hypergradient(approx, terms, 0.5, 0.0, extra_params=[unused])
        assert with_unused == pytest.approx(_hypergradient(approx, terms, 0.5, 0.0), rel=1e-10), approx


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.8])
@pytest.mark.parametrize("approx", [a for a in APPROXIMATIONS if a != "ggn"])  # ggn: its own tests
def test_one_dimensional_closed_form(alpha, approx):
    # L_CLS = (theta - a)^2, L_MM = (theta - b)^2, so theta*(alpha) = (1 - alpha) a + alpha b and the outer
    # objective (theta*(alpha) - c)^2 has derivative 2 (theta* - c)(b - a); H = 2, so identity with scale 1/2 is exact
    a, b, c = 1.0, -2.0, 0.5
    theta_star = (1 - alpha) * a + alpha * b
    theta = torch.tensor(theta_star, dtype=torch.float64, requires_grad=True)
    hypergradient = alpha_hypergradient(
        (theta - a) ** 2,
        (theta - b) ** 2,
        alpha,
        (theta - c) ** 2,
        [theta],
        approx,
        terms=40,
        scale=0.5 if approx == "identity" else 0.3,
        damping=0.0,
    )
    assert hypergradient == pytest.approx(2 * (theta_star - c) * (b - a), rel=1e-9)


def test_alpha_may_be_a_tensor_and_graphs_survive():
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    cls_loss, mm_loss = (theta - 1.0) ** 2, (theta + 1.0) ** 2
    value = alpha_hypergradient(cls_loss, mm_loss, torch.tensor(0.5), cls_loss, [theta], "cg", 2, 1.0, 0.0)
    # -(g_MM - g_CLS) H^-1 v with g_MM - g_CLS = 4, H = 2, v = 2 (theta - 1) = -1.4
    assert value == pytest.approx(-4 / 2 * -1.4, rel=1e-12)
    (cls_loss + mm_loss).backward()  # the caller can still train on the same forward pass
    assert theta.grad.item() == pytest.approx(2 * (0.3 - 1.0) + 2 * (0.3 + 1.0))


def test_unknown_approximation_lists_valid_names():
    theta = torch.tensor(0.0, requires_grad=True)
    for call in (
        lambda: inverse_hvp(lambda x: x, [torch.ones(1)], "lbfgs", 1, 1.0, 0.0),
        lambda: alpha_hypergradient(theta**2, theta**2, 0.5, theta**2, [theta], "lbfgs", 1, 1.0, 0.0),
    ):
        with pytest.raises(DmglError) as error:
            call()
        assert "'lbfgs'" in str(error.value)
        assert all(name in str(error.value) for name in ("identity", "neumann", "cg"))


def test_inverse_hvp_on_a_known_matrix():
    matrix = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    v = [torch.tensor([1.0, -1.0], dtype=torch.float64)]
    exact = torch.linalg.solve(matrix, v[0])

    def hvp(x):
        return [matrix @ x[0]]

    torch.testing.assert_close(inverse_hvp(hvp, v, "cg", 2, 1.0, 0.0)[0], exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inverse_hvp(hvp, v, "neumann", 200, 0.25, 0.0)[0], exact, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(inverse_hvp(hvp, v, "identity", 0, 0.25, 0.0)[0], 0.25 * v[0])
    # zero terms of Neumann is the identity approximation; a zero right-hand side gives zero
    torch.testing.assert_close(inverse_hvp(hvp, v, "neumann", 0, 0.25, 0.0)[0], 0.25 * v[0])
    assert torch.equal(inverse_hvp(hvp, [torch.zeros(2, dtype=torch.float64)], "cg", 5, 1.0, 0.0)[0], torch.zeros(2))


# ------------------------------------------------------------------------------------------------------------------
# Weight decay from the optimiser: the inner objective is L_tot + wd/2 ||theta||^2, so H = grad^2 L_tot + wd I.
OPTIMISER_DECAY = 0.03


def _plain_losses(weight, bias):
    """(L_CLS inner, L_MM inner, L_CLS outer) without any L2 term: the optimiser brings the weight decay."""
    logits_inner = X_INNER @ weight.T + bias
    cls_inner = F.cross_entropy(logits_inner, Y_INNER)
    mm_inner = 0.5 * (logits_inner - MATCHING_TARGETS).pow(2).sum(1).mean()
    return cls_inner, mm_inner, F.cross_entropy(X_OUTER @ weight.T + bias, Y_OUTER)


def _decayed_objective(theta, alpha):
    cls_inner, mm_inner, _ = _plain_losses(*_unflatten(theta))
    return (1 - alpha) * cls_inner + alpha * mm_inner + 0.5 * OPTIMISER_DECAY * theta.pow(2).sum()


def _decayed_optimum(alpha):
    theta = torch.zeros(N_PARAMS, dtype=torch.float64)
    for _ in range(40):
        point = theta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_decayed_objective(point, alpha), point)
        if grad.norm() < 1e-14:
            break
        hessian = torch.autograd.functional.hessian(lambda t: _decayed_objective(t, alpha), theta)
        theta = theta - torch.linalg.solve(hessian, grad)
    return theta


DECAYED_STAR = _decayed_optimum(ALPHA)


def _decayed_exact():
    theta = DECAYED_STAR.detach().requires_grad_(True)
    cls_inner, mm_inner, cls_outer = _plain_losses(*_unflatten(theta))
    g_cls, g_mm, v = (
        torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in (cls_inner, mm_inner, cls_outer)
    )
    hessian = torch.autograd.functional.hessian(lambda t: _decayed_objective(t, ALPHA), DECAYED_STAR)
    return float(-(g_mm - g_cls) @ torch.linalg.solve(hessian, v)), hessian


DECAYED_EXACT, DECAYED_HESSIAN = _decayed_exact()


def _decayed(approx, terms, scale, weight_decay=OPTIMISER_DECAY, damping=0.0):
    weight, bias = (t.clone().requires_grad_(True) for t in _unflatten(DECAYED_STAR))
    cls_inner, mm_inner, cls_outer = _plain_losses(weight, bias)
    return implicit_hypergradient(
        cls_inner, mm_inner, ALPHA, cls_outer, [weight, bias], approx, terms, scale, damping, weight_decay=weight_decay
    )


def test_weight_decay_problem_is_the_bilevel_derivative():
    step = 1e-4
    outer = [_plain_losses(*_unflatten(_decayed_optimum(ALPHA + s)))[2].item() for s in (step, -step)]
    assert DECAYED_EXACT == pytest.approx((outer[0] - outer[1]) / (2 * step), rel=1e-6)


def test_default_cg_includes_the_optimisers_weight_decay_in_h():
    from dmgl_cli.config import LearningBasedConfig

    terms = LearningBasedConfig().terms  # the default number of CG iterations
    with_decay = _decayed("cg", terms, None)
    assert with_decay.value == pytest.approx(DECAYED_EXACT, rel=1e-3)
    assert not with_decay.negative_curvature and with_decay.relative_residual < 1e-6
    without = _decayed("cg", terms, None, weight_decay=0.0).value
    assert without != pytest.approx(DECAYED_EXACT, rel=1e-2)  # leaving the decay out of H is measurably wrong
    per_tensor = _decayed("cg", terms, None, weight_decay=[OPTIMISER_DECAY, OPTIMISER_DECAY]).value
    assert per_tensor == pytest.approx(with_decay.value, rel=1e-12)


def test_neumann_with_lambda_max_scale_converges_with_weight_decay():
    true_max = torch.linalg.eigvalsh(DECAYED_HESSIAN).max().item()
    result = _decayed("neumann", 400, None)
    assert result.largest_eigenvalue == pytest.approx(true_max, rel=0.05)
    assert result.value == pytest.approx(DECAYED_EXACT, rel=1e-3)
    assert result.hessian_products >= 400  # power iterations + series


def test_largest_eigenvalue_by_power_iteration():
    matrix = torch.diag(torch.tensor([5.0, 2.0, -1.0, 0.5], dtype=torch.float64))
    estimate = largest_eigenvalue(lambda x: [matrix @ x[0]], [torch.zeros(4, dtype=torch.float64)], iterations=60)
    assert estimate == pytest.approx(5.0, rel=1e-6)
    dominant_negative = torch.diag(torch.tensor([1.0, -4.0], dtype=torch.float64))
    estimate = largest_eigenvalue(lambda x: [dominant_negative @ x[0]], [torch.zeros(2, dtype=torch.float64)], 60)
    assert estimate == pytest.approx(4.0, rel=1e-6)  # the magnitude bounds the spectrum


def test_cg_reports_negative_curvature():
    indefinite = torch.tensor([[-1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    result = conjugate_gradient(lambda x: [indefinite @ x[0]], [torch.tensor([1.0, 0.0], dtype=torch.float64)], 10)
    assert result.negative_curvature and result.iterations == 1
    assert torch.equal(result.solution[0], torch.zeros(2, dtype=torch.float64)) and result.relative_residual == 1.0
    definite = conjugate_gradient(
        lambda x: [-indefinite @ x[0] + 3 * x[0]], [torch.tensor([1.0, 1.0], dtype=torch.float64)], 10
    )
    assert not definite.negative_curvature and definite.relative_residual < 1e-6


def test_coupled_weight_decay_per_parameter_group():
    first, second, unheld = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    groups = [{"params": [first], "weight_decay": 0.1}, {"params": [second], "weight_decay": 0.0}]
    for optimizer_class in (torch.optim.SGD, torch.optim.Adam):
        optimizer = optimizer_class(groups, lr=0.1)
        assert coupled_weight_decay(optimizer, [first, second, unheld]) == [0.1, 0.0, 0.0]
    adamw = torch.optim.AdamW([{"params": [first], "weight_decay": 0.1}], lr=0.1)
    assert coupled_weight_decay(adamw, [first]) == [0.0]  # decoupled decay is in no objective


def test_first_tensor_hessian_gradient_mean_against_the_full_hessian():
    # the authors' rule: mean over the first tensor of H g_CLS, H of (1 - a) CLS + a MM on the same batch
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    bias = torch.randn(3, generator=generator, dtype=torch.float64)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    target = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    alpha = 0.7

    def losses(w, b):
        logits = x @ w.T + b
        return F.cross_entropy(logits, y), (logits - target).pow(2).mean()

    def flat_losses(theta):
        return losses(theta[:12].reshape(3, 4), theta[12:])

    theta = torch.cat([weight.reshape(-1), bias])
    hessian = torch.autograd.functional.hessian(
        lambda t: (1 - alpha) * flat_losses(t)[0] + alpha * flat_losses(t)[1], theta
    )
    point = theta.clone().requires_grad_(True)
    (g_cls,) = torch.autograd.grad(flat_losses(point)[0], point)
    expected = float((hessian @ g_cls)[:12].mean())
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    cls_loss, mm_loss = losses(w, b)
    assert first_tensor_hessian_gradient_mean(cls_loss, mm_loss, alpha, [w, b]) == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------------------------------------------------------
# The generalised Gauss-Newton mode and the flagged fallback of an untrusted CG solve.


def _ggn_on_the_decayed_problem(terms, relative_damping=0.0, damping=0.0, max_residual=None):
    """ggn on the weight-decay problem: its logits are linear in the parameters, so J is constant, the GGN *is* the
    Hessian, and ggn must give Eq. 3 exactly."""
    from dmgl_cli.hypergradient import ggn_hypergradient, mixed_gradient

    weight, bias = (t.clone().requires_grad_(True) for t in _unflatten(DECAYED_STAR))
    logits = X_INNER @ weight.T + bias
    cls_inner = F.cross_entropy(logits, Y_INNER)
    mm_inner = 0.5 * (logits - MATCHING_TARGETS).pow(2).sum(1).mean()
    cls_outer = F.cross_entropy(X_OUTER @ weight.T + bias, Y_OUTER)

    def convex_loss(values):  # the inner loss as a function of the logits, convex in them
        return (1 - ALPHA) * F.cross_entropy(values[0], Y_INNER) + ALPHA * 0.5 * (values[0] - MATCHING_TARGETS).pow(
            2
        ).sum(1).mean()

    mixed = mixed_gradient(cls_inner, mm_inner, [weight, bias])
    return ggn_hypergradient(
        [logits],
        convex_loss,
        mixed,
        cls_outer,
        [weight, bias],
        terms,
        damping,
        relative_damping,
        weight_decay=OPTIMISER_DECAY,
        tolerance=1e-12,
        max_residual=max_residual,
        fallback_scale=0.05,
    )


def test_ggn_equals_eq3_where_the_network_is_linear_in_its_parameters():
    result = _ggn_on_the_decayed_problem(N_PARAMS + 5)
    assert result.value == pytest.approx(DECAYED_EXACT, rel=1e-8)
    assert not result.negative_curvature and result.relative_residual < 1e-10 and not result.fallback
    # Levenberg-Marquardt damping: exactly Eq. 3 with mu added to H, mu = relative_damping * lambda_max(G)
    damped = _ggn_on_the_decayed_problem(N_PARAMS + 5, relative_damping=0.1)
    lambda_max = float(torch.linalg.eigvalsh(DECAYED_HESSIAN).max())
    assert damped.largest_eigenvalue == pytest.approx(lambda_max, rel=1e-2)  # 10 power iterations
    hessian = DECAYED_HESSIAN + 0.1 * damped.largest_eigenvalue * torch.eye(N_PARAMS, dtype=torch.float64)
    theta = DECAYED_STAR.detach().requires_grad_(True)
    cls_inner, mm_inner, cls_outer = _plain_losses(*_unflatten(theta))
    g_cls, g_mm, v = (torch.autograd.grad(x, theta, retain_graph=True)[0] for x in (cls_inner, mm_inner, cls_outer))
    assert damped.value == pytest.approx(float(-(g_mm - g_cls) @ torch.linalg.solve(hessian, v)), rel=1e-8)


def test_ggn_is_positive_semi_definite_where_the_hessian_is_not():
    """A two-layer tanh network: its loss Hessian has negative eigenvalues; the GGN J^T H_out J has none."""
    from dmgl_cli.curvature import hessian_vector_product
    from dmgl_cli.hypergradient import ggn_hypergradient, mixed_gradient

    generator = torch.Generator().manual_seed(0)
    first = (2.0 * torch.randn(6, FEATURES, generator=generator, dtype=torch.float64)).requires_grad_(True)
    second = (2.0 * torch.randn(CLASSES, 6, generator=generator, dtype=torch.float64)).requires_grad_(True)
    params = [first, second]
    logits = torch.tanh(X_INNER @ first.T) @ second.T
    cls_inner = F.cross_entropy(logits, Y_INNER)
    flat = sum(p.numel() for p in params)
    hessian = torch.autograd.functional.hessian(
        lambda w: F.cross_entropy(torch.tanh(X_INNER @ w[:24].reshape(6, 4).T) @ w[24:].reshape(3, 6).T, Y_INNER),
        torch.cat([first.detach().flatten(), second.detach().flatten()]),
    )
    assert float(torch.linalg.eigvalsh(hessian).min()) < -1e-4  # indefinite
    gradient = torch.autograd.grad(cls_inner, params, create_graph=True)
    probe = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    assert hessian_vector_product(gradient, params, probe)[0].shape == first.shape
    # CG on H flags what it meets; ggn on the same problem converges without negative curvature
    cls_outer = F.cross_entropy(torch.tanh(X_OUTER @ first.T) @ second.T, Y_OUTER)
    mm_inner = 0.5 * (logits - MATCHING_TARGETS).pow(2).sum(1).mean()

    def convex_loss(values):
        return (1 - ALPHA) * F.cross_entropy(values[0], Y_INNER) + ALPHA * 0.5 * (values[0] - MATCHING_TARGETS).pow(
            2
        ).sum(1).mean()

    mixed = mixed_gradient(cls_inner, mm_inner, params)
    on_h = implicit_hypergradient(
        cls_inner, mm_inner, ALPHA, cls_outer, params, "cg", flat, None, 0.0, max_residual=0.5, fallback_scale=0.05
    )
    assert on_h.negative_curvature and on_h.fallback  # met, and not used
    result = ggn_hypergradient(
        [logits],
        convex_loss,
        mixed,
        cls_outer,
        params,
        flat,
        0.0,
        1e-2,
        tolerance=1e-6,
        max_residual=0.5,
        fallback_scale=0.05,
    )
    assert not result.negative_curvature and not result.fallback and result.relative_residual < 1e-6


def test_an_untrusted_cg_solve_falls_back_to_identity_and_says_so():
    """CG on an indefinite H stops at negative curvature: with max_residual the truncated iterate is not used."""
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    curvature = torch.tensor([1.0, -2.0], dtype=torch.float64)  # H = diag(1, -2): indefinite
    cls_inner = 0.5 * (curvature * theta**2).sum()
    mm_inner = (torch.tensor([1.0, 1.0], dtype=torch.float64) * theta).sum()
    outer_point = torch.tensor([1.0, 1.0], dtype=torch.float64)
    cls_outer = (outer_point * theta).sum()
    args = (cls_inner, mm_inner, 0.0, cls_outer, [theta], "cg", 5, None, 0.0)
    kept = implicit_hypergradient(*args, outer_shares_graph=True)
    assert kept.negative_curvature and not kept.fallback  # without max_residual: reported, not replaced
    flagged = implicit_hypergradient(*args, outer_shares_graph=True, max_residual=0.5, fallback_scale=0.1)
    mixed = torch.tensor([1.0, 1.0], dtype=torch.float64) - curvature * theta.detach()
    assert flagged.fallback and flagged.value == pytest.approx(float(-0.1 * mixed @ outer_point), rel=1e-12)
    # a well-posed solve is kept: the decayed logistic problem's CG residual is tiny
    assert not _decayed("cg", 20, None).fallback
