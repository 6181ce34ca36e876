"""DOMFN (our reconstruction) on tiny toys, each expected value computed by hand: the pairwise Jensen–Shannon
divergence, the margin penalty of the amended loss, and the instance-aware prediction."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dmgl_cli.config import load_config
from dmgl_cli.methods import build_method
from dmgl_cli.models import ModelOutput


def _domfn(*settings: str):
    config = load_config("synthetic", ["method.name=domfn", "strategy.name=constant", *settings])
    return build_method(config)


def _softmax(row: list[float]) -> list[float]:
    total = sum(math.exp(x) for x in row)
    return [math.exp(x) / total for x in row]


def _js(p: list[float], q: list[float]) -> float:
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    return 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m, strict=True)) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(q, m, strict=True)
    )


def _divergences(unimodal: dict[str, torch.Tensor]) -> list[float]:
    """Per sample: the mean over modality pairs of the JS divergence of their softmax outputs."""
    rows = {m: z.tolist() for m, z in unimodal.items()}
    n = len(next(iter(rows.values())))
    pairs = list(itertools.combinations(sorted(rows), 2))
    return [sum(_js(_softmax(rows[a][i]), _softmax(rows[b][i])) for a, b in pairs) / len(pairs) for i in range(n)]


def test_margin_penalty_by_hand(registry):
    method = _domfn("method.options.domfn.margin=0.25", "method.options.domfn.beta=2.0")
    # Sample 0 agrees (divergence 0), sample 1 disagrees mildly, sample 2 strongly.
    unimodal = {
        "fast": torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [4.0, 0.0, 0.0]]),
        "slow": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0]]),
    }
    labels = torch.tensor([0, 1, 2])
    output = ModelOutput(logits=torch.zeros(3, 3), unimodal_logits=unimodal, embeddings={})
    divergences = _divergences(unimodal)
    assert divergences[0] == pytest.approx(0.0, abs=1e-12) and divergences[1] < divergences[2] <= math.log(2)
    assert divergences[1] < 0.25 < divergences[2]  # only the last one is beyond the margin
    penalty = 2.0 * sum(max(0.0, d - 0.25) for d in divergences) / 3
    unimodal_ce = sum(-math.log(_softmax(z.tolist()[i])[labels[i]]) / 3 for z in unimodal.values() for i in range(3))
    losses = method.extra_losses(output, labels, {})
    assert float(losses["domfn_penalty"]) == pytest.approx(penalty, rel=1e-5)
    assert float(losses["domfn_unimodal"]) == pytest.approx(unimodal_ce, rel=1e-5)
    assert method.rejected(output).tolist() == [False, False, True]


def test_three_modalities_average_the_pairs(registry):
    method = _domfn("method.options.domfn.margin=0.2", "method.options.domfn.beta=1.0")
    torch.manual_seed(0)
    unimodal = {m: 3 * torch.randn(4, 3) for m in ("audio", "text", "visual")}
    output = ModelOutput(logits=torch.zeros(4, 3), unimodal_logits=unimodal, embeddings={})
    expected = sum(max(0.0, d - 0.2) for d in _divergences(unimodal)) / 4
    assert float(method.extra_losses(output, torch.zeros(4, dtype=torch.long), {})["domfn_penalty"]) == pytest.approx(
        expected, rel=1e-5
    )


def test_rejected_samples_take_the_most_confident_head(registry):
    method = _domfn("method.options.domfn.margin=0.1")
    unimodal = {"fast": torch.tensor([[1.0, 0.0], [3.0, 0.0]]), "slow": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    fused = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    prediction = method.predict(ModelOutput(logits=fused, unimodal_logits=unimodal, embeddings={}))
    # Sample 0: the heads agree, the fused prediction stands. Sample 1: they diverge (JS > 0.1); the fast head is
    # the more confident (max prob e^3/(e^3+1) > e/(e+1)), so its log-probabilities are used.
    assert prediction[0].tolist() == pytest.approx([math.log(p) for p in _softmax([0.0, 2.0])])
    assert prediction[1].tolist() == pytest.approx([math.log(p) for p in _softmax([3.0, 0.0])])
