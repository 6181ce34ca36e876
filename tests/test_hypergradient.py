"""The hypergradient against quantities formed exactly: a Hessian small enough to invert, and closed forms."""

import pytest
import torch
import torch.nn.functional as F

from dmgl_cli.errors import DmglError
from dmgl_cli.hypergradient import APPROXIMATIONS, alpha_hypergradient, hessian_vector_product, inverse_hvp

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
@pytest.mark.parametrize("approx", APPROXIMATIONS)
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
