"""MLA's mechanism on tiny toys, each expected value computed by hand: the gradient modification of the shared head
(``GSPlugin.before_update`` of the authors' code) and the entropy-weighted test-time fusion."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dmgl_cli.config import load_config
from dmgl_cli.device import seed_everything
from dmgl_cli.errors import DmglError
from dmgl_cli.methods import build_method
from dmgl_cli.methods.mla import SharedHeadFusion, entropy_weights, update_projection

SPECS = {m: {"kind": "vector", "dtype": "float32", "shape": [6]} for m in ("fast", "slow")}
BATCHES = 5  # batches per epoch the fake trainer reports


def _mla(*settings: str):
    config = load_config("synthetic", ["method.name=mla", "strategy.name=constant", "model.embed_dim=3", *settings])
    method = build_method(config)
    seed_everything(0)
    model = method.build_model(SPECS, 4)
    method.attach(SimpleNamespace(train_loader=range(BATCHES), device=torch.device("cpu")))
    return method, model


def _projection_by_hand(p: list[list[float]], features: list[list[float]], a: float, elementwise: bool):
    """P - k k^T / (a + k r) (element-wise, the code) or / (a + r k) (scalar), then / ||.||_F; plain floats."""
    d, n = len(p), len(features)
    r = [sum(row[j] for row in features) / n for j in range(d)]
    k = [sum(p[i][j] * r[j] for j in range(d)) for i in range(d)]
    rk = sum(r[i] * k[i] for i in range(d))
    new = [[p[i][j] - k[i] * k[j] / (a + (k[i] * r[j] if elementwise else rk)) for j in range(d)] for i in range(d)]
    norm = math.sqrt(sum(x * x for row in new for x in row))
    return [[x / norm for x in row] for row in new]


def _matmul_transposed(g: list[list[float]], p: list[list[float]]) -> list[list[float]]:
    """g P^T by hand."""
    return [[sum(g[c][k] * p[j][k] for k in range(len(p))) for j in range(len(p))] for c in range(len(g))]


def test_projection_update_follows_the_code_by_hand():
    features = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, 1.0], [-0.5, 2.0, 0.0], [0.5, 1.0, 1.0]])
    start = torch.tensor([[1.0, 0.2, 0.0], [0.1, 0.9, -0.3], [0.0, 0.4, 1.1]])
    a = 0.1 ** (1 + 2 / 5)
    for denominator, elementwise in (("elementwise", True), ("scalar", False)):
        expected = _projection_by_hand(start.tolist(), features.tolist(), a, elementwise)
        got = update_projection(start, features, a, denominator)
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # The code's element-wise denominator is not the scalar one of the orthogonal projector.
    assert not torch.allclose(
        update_projection(start, features, a, "elementwise"), update_projection(start, features, a, "scalar"), atol=1e-3
    )


def test_the_applied_head_gradient_is_projected(registry):
    method, model = _mla()
    weight, bias = model.fusion.head.weight, model.fusion.head.bias
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    inputs = {m: torch.randn(8, 6) for m in SPECS}
    labels = torch.randint(0, 4, (8,))
    projection = torch.eye(3).tolist()

    def step(modality: str):
        method.start_pass(modality)
        output = method.forward(model, inputs, training=True)
        assert list(output.unimodal_logits) == [modality]  # one modality per optimiser step
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(output.logits, labels).backward()
        raw, raw_bias, before = weight.grad.clone(), bias.grad.clone(), weight.detach().clone()
        method.after_backward(model, output, labels, {"epoch": 1})
        assert torch.equal(bias.grad, raw_bias)  # the bias is never modified
        optimizer.step()
        return raw, before, output.embeddings[modality].detach()

    # The run's very first step is not modified (the code's exp_count == 0).
    raw, before, _ = step("fast")
    assert torch.allclose(weight.detach(), before - 0.1 * raw)

    # Second step (batch 0 of 5: a = 0.1): P updated with the slow features, the gradient replaced by g P^T.
    raw, before, features = step("slow")
    projection = _projection_by_hand(projection, features.tolist(), 0.1, elementwise=True)
    expected = torch.tensor(_matmul_transposed(raw.tolist(), projection))
    torch.testing.assert_close(method.projection, torch.tensor(projection), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, raw, atol=1e-4)  # the modification really changes the gradient
    assert torch.allclose(weight.detach(), before - 0.1 * expected, atol=1e-6)  # and it is what the step applied

    # Next batch: a anneals to 0.1 ** (1 + 1/5) and P keeps accumulating.
    raw, before, features = step("fast")
    projection = _projection_by_hand(projection, features.tolist(), 0.1**1.2, elementwise=True)
    expected = torch.tensor(_matmul_transposed(raw.tolist(), projection))
    assert method.batch == 1
    assert torch.allclose(weight.detach(), before - 0.1 * expected, atol=1e-6)
    assert method.steps_taken == 3


def test_projection_false_leaves_the_gradient_alone(registry):
    method, model = _mla("method.options.mla.projection=false")
    inputs = {m: torch.randn(8, 6) for m in SPECS}
    labels = torch.randint(0, 4, (8,))
    for modality in ("fast", "slow", "fast"):
        method.start_pass(modality)
        output = method.forward(model, inputs, training=True)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(output.logits, labels).backward()
        raw = model.fusion.head.weight.grad.clone()
        method.after_backward(model, output, labels, {"epoch": 1})
        assert torch.equal(model.fusion.head.weight.grad, raw)
    assert torch.equal(method.projection, torch.eye(3))


def test_fusion_weights_by_hand():
    logits = {
        "fast": torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        "slow": torch.tensor([[0.5, 0.5], [3.0, -1.0], [0.0, 0.0]]),
    }
    rows = {m: z.tolist() for m, z in logits.items()}

    # The code: softmax over the BATCH axis per class, entropy summed over the batch: one weight per modality.
    def batch_entropy(z):
        total = 0.0
        for c in range(2):
            column = [math.exp(z[i][c]) for i in range(3)]
            for value in column:
                p = value / sum(column)
                total -= p * math.log(p)
        return total

    e = {m: batch_entropy(z) for m, z in rows.items()}
    w_fast = math.exp(-e["fast"]) / (math.exp(-e["fast"]) + math.exp(-e["slow"]))
    weights = entropy_weights(logits, "batch-entropy")
    assert weights[0].tolist() == pytest.approx([w_fast] * 3) and weights[1].tolist() == pytest.approx([1 - w_fast] * 3)

    # Ours / BalanceBenchmark: each sample's entropy over its classes.
    def sample_entropy(row):
        probs = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
        return -sum(p * math.log(p) for p in probs)

    per_sample = [
        math.exp(-sample_entropy(rows["fast"][i]))
        / (math.exp(-sample_entropy(rows["fast"][i])) + math.exp(-sample_entropy(rows["slow"][i])))
        for i in range(3)
    ]
    assert entropy_weights(logits, "sample-entropy")[0].tolist() == pytest.approx(per_sample)

    # The fused logits are the weighted sum of the shared head's per-modality logits.
    fusion = SharedHeadFusion(["fast", "slow"], 2, 2, "batch-entropy")
    with torch.no_grad():
        fusion.head.weight.copy_(torch.eye(2))
        fusion.head.bias.zero_()
    fused, unimodal = fusion(logits)
    assert torch.allclose(fused, w_fast * logits["fast"] + (1 - w_fast) * logits["slow"])
    assert torch.equal(unimodal["slow"], logits["slow"])


@pytest.mark.parametrize(("setting", "value"), [("fusion", "mean"), ("denominator", "matrix"), ("projection", "1")])
def test_bad_settings_are_refused(registry, setting, value):
    with pytest.raises(DmglError, match=f"method.options.mla.{setting}"):
        _mla(f"method.options.mla.{setting}={value}")
