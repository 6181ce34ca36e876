"""The fast paths give the values of the plain ones: batched Hessian-vector products, the two-sided Neumann series,
the hypergradient built on them, and the loader's one-copy gather; `dmgl train`'s start-up imports only what its
encoders need, and its quick exit keeps what a normal exit does."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from processes import finish
from torch import nn

from dmgl_cli.curvature import dot, hessian_vector_product, hessian_vector_products, inverse_hvp, neumann_bilinear
from dmgl_cli.data.loader import ROW_BY_ROW_BYTES, gather_rows
from dmgl_cli.hypergradient import alpha_hypergradient


def _conv_problem():
    """A small conv + batch-norm net (the operators the real encoders use) and its two inner losses and outer loss."""
    generator = torch.Generator().manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    x = torch.randn(6, 3, 8, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    x_outer = torch.randn(5, 3, 8, 8, generator=generator, dtype=torch.float64)
    y_outer = torch.randint(0, 3, (5,), generator=generator)
    logits = net(x)
    cls = nn.functional.cross_entropy(logits, y)
    mm = logits.pow(2).mean()  # any second loss on the same graph
    outer = nn.functional.cross_entropy(net(x_outer), y_outer)
    return list(net.parameters()), cls, mm, outer


def test_batched_hessian_vector_products_equal_one_at_a_time():
    params, cls, mm, _ = _conv_problem()
    grads = list(torch.autograd.grad(0.6 * cls + 0.4 * mm, params, create_graph=True))
    generator = torch.Generator().manual_seed(1)
    vectors = [[torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params] for _ in range(3)]
    batched = hessian_vector_products(grads, params, vectors)
    for vector, product in zip(vectors, batched, strict=True):
        single = hessian_vector_product(grads, params, vector)
        for a, b in zip(product, single, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batched_products_of_an_unreached_parameter_are_zero():
    theta = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    unused = torch.ones(2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(theta.pow(3).sum(), [theta], create_graph=True)
    vectors = [
        [torch.tensor([2.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64)],
        [torch.tensor([-1.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64)],
    ]
    products = hessian_vector_products([grad, torch.zeros(2, dtype=torch.float64)], [theta, unused], vectors)
    assert [p[0].item() for p in products] == pytest.approx([9 * 2.0, 9 * -1.0])
    assert all(torch.equal(p[1], torch.zeros(2, dtype=torch.float64)) for p in products)


@pytest.mark.parametrize("terms", [0, 1, 2, 3, 4, 7])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_two_sided_neumann_equals_the_series_applied_to_one_side(terms, damping):
    matrix = torch.tensor([[3.0, 1.0, 0.2], [1.0, 2.0, -0.4], [0.2, -0.4, 1.5]], dtype=torch.float64)
    left = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)]
    right = [torch.tensor([0.3, 1.0, -1.0], dtype=torch.float64)]
    calls = []

    def hvps(vectors):
        calls.append(len(vectors))
        return [[matrix @ v[0]] for v in vectors]

    value = neumann_bilinear(hvps, left, right, terms, 0.2, damping)
    expected = dot(left, inverse_hvp(lambda x: [matrix @ x[0]], right, "neumann", terms, 0.2, damping))
    assert float(value) == pytest.approx(float(expected), rel=1e-12, abs=1e-14)
    # ceil(terms / 2) rounds of products instead of terms products one after another
    assert len(calls) == -(-terms // 2) and sum(calls) == terms


@pytest.mark.parametrize(
    "approx,terms,scale", [("identity", 0, 0.04), ("neumann", 3, 0.05), ("neumann", 4, 0.05), ("cg", 3, 1.0)]
)
def test_hypergradient_equals_its_definition_on_a_conv_net(approx, terms, scale):
    params, cls, mm, outer = _conv_problem()
    alpha = 0.35
    value = alpha_hypergradient(cls, mm, alpha, outer, params, approx, terms, scale, 0.1)
    # the definition, written out: separate gradients, one product at a time
    v = torch.autograd.grad(outer, params, retain_graph=True)
    g_cls = torch.autograd.grad(cls, params, retain_graph=True, create_graph=True)
    g_mm = torch.autograd.grad(mm, params, retain_graph=True, create_graph=True)
    g_tot = [(1 - alpha) * a + alpha * b for a, b in zip(g_cls, g_mm, strict=True)]
    h_inv_v = inverse_hvp(lambda x: hessian_vector_product(g_tot, params, x), v, approx, terms, scale, 0.1)
    expected = -float(dot([(b - a).detach() for a, b in zip(g_cls, g_mm, strict=True)], h_inv_v))
    assert value == pytest.approx(expected, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("row_shape,dtype", [((8,), np.float32), ((3, 96, 96, 3), np.uint8), ((257, 70), np.float32)])
def test_gather_rows_equals_fancy_indexing_in_batch_order(tmp_path, row_shape, dtype):
    rng = np.random.default_rng(0)
    path = tmp_path / "array.npy"
    np.save(path, rng.integers(0, 200, (40, *row_shape)).astype(dtype))
    array = np.load(path, mmap_mode="r")
    rows = np.array([17, 3, 39, 3, 0, 25, 11])  # unsorted, with a repeat
    gathered = gather_rows(array, rows)
    assert gathered.flags["C_CONTIGUOUS"] and gathered.dtype == array.dtype
    np.testing.assert_array_equal(gathered, np.asarray(array)[rows])
    row_bytes = np.dtype(dtype).itemsize * int(np.prod(row_shape))
    assert (row_bytes >= ROW_BY_ROW_BYTES) == (row_shape != (8,))  # both paths are exercised


# ------------------------------------------------------------------------------------------ start-up and exit


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` run by this interpreter in a process group of its own; bounded, the group killed on a timeout."""
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, err = finish(process, timeout, "a child python")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_a_run_of_mlp_encoders_imports_neither_torchvision_nor_sklearn_nor_dynamo():
    # what `dmgl train` loads before its first step: the models, the metrics, the device switches, an MLP model
    found = _python(
        "import sys\n"
        "from dmgl_cli import device, metrics, models\n"
        "from dmgl_cli.models.vision import ResNetTrunk, SpectrogramEncoder\n"
        "device.configure_determinism(False)\n"
        "import numpy as np\n"
        "metrics.classification_scores(np.array([0, 1, 1]), np.eye(3)[:, :2])  # a first evaluation's scores\n"
        "print(' '.join(m for m in ('torchvision', 'sklearn', 'torch._dynamo') if m in sys.modules))\n"
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == ""


def test_resnets_still_build_with_torchvision_imported_on_demand():
    from dmgl_cli.models.vision import VIDEO_ARCHS, ResNetTrunk, _ScaledVideoResNet

    trunk = ResNetTrunk("resnet18", 1, width=4)
    assert trunk(torch.zeros(2, 1, 32, 32)).shape == (2, 32)
    assert set(VIDEO_ARCHS) == {"r3d_18", "mc3_18", "r2plus1d_18"}
    video = _ScaledVideoResNet("r3d_18", 3, 4).eval()
    assert video(torch.zeros(1, 3, 2, 16, 16)).shape == (1, 32)


QUICK_EXIT_SCRIPT = """
import atexit, sys, threading, time
from dmgl_cli.quick_exit import run_then_exit

out = sys.argv[1]


def late_writer():
    time.sleep(0.3)
    open(out + ".thread", "w").write("done")


def command():
    threading.Thread(target=late_writer).start()  # not a daemon: the exit waits for it
    atexit.register(lambda: open(out + ".atexit", "w").write("done"))
    print("printed", end="")
    if sys.argv[2] == "message":
        raise SystemExit("a message for the user")
    sys.exit(int(sys.argv[2]))


run_then_exit(command)
"""


def test_quick_exit_keeps_the_exit_code_output_threads_and_atexit_handlers(tmp_path):
    out = str(tmp_path / "marker")
    done = _python(QUICK_EXIT_SCRIPT, out, "3")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "printed"  # flushed although stdout is a pipe (block-buffered)
    assert (tmp_path / "marker.thread").read_text() == "done"
    assert (tmp_path / "marker.atexit").read_text() == "done"


def test_quick_exit_leaves_an_exit_with_a_message_to_python(tmp_path):
    done = _python(QUICK_EXIT_SCRIPT, str(tmp_path / "marker"), "message")
    assert done.returncode == 1
    assert "a message for the user" in done.stderr
    assert (tmp_path / "marker.atexit").read_text() == "done"
