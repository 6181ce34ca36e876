"""OGM-GE against the authors' code (GeWu-Lab/OGM-GE_CVPR2022, main.py, train_epoch): the coefficient from the
head split's true-class scores, applied to the encoders' 4-D (convolution) gradients only, and the Gaussian noise
with the gradient's own std — checked by hand on a toy."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from dmgl_cli.config import load_config
from dmgl_cli.methods import build_method
from dmgl_cli.models import ModelOutput, MultimodalModel
from dmgl_cli.models.fusion import ConcatFusion


def _ogm(*overrides: str):
    config = load_config("synthetic", ["method.name=ogm-ge", *(f"method.options.ogm-ge.{o}" for o in overrides)])
    return build_method(config)


def _conv_model(channels: int = 4) -> MultimodalModel:
    """Per modality: conv (4-D kernel, bias) -> BatchNorm -> pool -> Linear projection (2-D weight)."""
    torch.manual_seed(0)
    encoders = nn.ModuleDict(
        {
            m: nn.Sequential(
                nn.Conv2d(channels, channels, 3),
                nn.BatchNorm2d(channels),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(channels, 6),
            )
            for m in ("a", "v")
        }
    )
    model = MultimodalModel(encoders, ConcatFusion(["a", "v"], 6, 2))
    generator = torch.Generator().manual_seed(1)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator) * 3.0
    return model


# Per-modality logits of a batch of two (label 0, 1): audio is right with high confidence, visual is not.
AUDIO = [[2.0, 0.0], [0.0, 1.0]]
VISUAL = [[0.0, 0.5], [0.3, 0.0]]
LABELS = [0, 1]


def _output() -> ModelOutput:
    unimodal = {"a": torch.tensor(AUDIO), "v": torch.tensor(VISUAL)}
    return ModelOutput(logits=unimodal["a"] + unimodal["v"], unimodal_logits=unimodal, embeddings={})


def _true_class_score(logits: list[list[float]]) -> float:
    return sum(math.exp(row[y]) / sum(math.exp(x) for x in row) for row, y in zip(logits, LABELS, strict=True))


def _expected_coefficient(alpha: float) -> tuple[float, float]:
    ratio_a = _true_class_score(AUDIO) / _true_class_score(VISUAL)
    assert ratio_a > 1  # audio dominates: its coefficient is 1 - tanh(alpha * ratio_a), visual keeps 1
    return 1.0 - math.tanh(alpha * ratio_a), ratio_a


def test_only_the_dominant_encoders_convolution_gradients_are_scaled_by_the_logged_coefficient():
    model = _conv_model()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    method = _ogm("noise=false")
    method.after_backward(model, _output(), torch.tensor(LABELS), {"epoch": 1})
    coefficient, ratio = _expected_coefficient(0.8)
    logged = method.epoch_statistics()
    assert logged["ogm_coeff_a"] == pytest.approx(coefficient) and logged["ogm_coeff_v"] == 1.0
    assert logged["ogm_ratio_a"] == pytest.approx(ratio) and logged["ogm_ratio_v"] == pytest.approx(1 / ratio)
    grads = dict(model.named_parameters())
    # The audio conv kernel: exactly the logged coefficient times its gradient.
    assert torch.allclose(grads["encoders.a.0.weight"].grad, logged["ogm_coeff_a"] * before["encoders.a.0.weight"])
    for name, param in grads.items():
        if name != "encoders.a.0.weight":  # conv bias, BatchNorm, projection, head, visual encoder: untouched
            assert torch.equal(param.grad, before[name]), name


def test_weights_option_also_scales_the_projection():
    model = _conv_model()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    method = _ogm("noise=false", "params=weights", "alpha=0.3")
    method.after_backward(model, _output(), torch.tensor(LABELS), {"epoch": 1})
    coefficient, _ = _expected_coefficient(0.3)
    grads = dict(model.named_parameters())
    for name in ("encoders.a.0.weight", "encoders.a.4.weight"):
        assert torch.allclose(grads[name].grad, coefficient * before[name]), name
    for name in ("encoders.a.0.bias", "encoders.a.4.bias", "encoders.a.1.weight", "fusion.head.weight"):
        assert torch.equal(grads[name].grad, before[name]), name


def test_generalisation_noise_has_the_gradients_std():
    model = _conv_model(channels=48)  # 48*48*3*3 = 20736 entries per kernel: a tight estimate of the std
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.manual_seed(5)
    method = _ogm()
    method.after_backward(model, _output(), torch.tensor(LABELS), {"epoch": 1})
    coefficient, _ = _expected_coefficient(0.8)
    for modality, scale in (("a", coefficient), ("v", 1.0)):  # the noise goes to every modality's kernels
        name = f"encoders.{modality}.0.weight"
        original = before[name]
        noise = dict(model.named_parameters())[name].grad - scale * original
        expected_std = float(original.std()) + 1e-8  # std of the unscaled gradient (about 3 here)
        assert float(noise.std()) == pytest.approx(expected_std, rel=0.03)
        assert abs(float(noise.mean())) < 0.05 * expected_std
    assert torch.equal(dict(model.named_parameters())["encoders.a.4.weight"].grad, before["encoders.a.4.weight"])


def test_nothing_happens_outside_the_window():
    model = _conv_model()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    method = _ogm("start_epoch=2", "end_epoch=3")
    for epoch in (1, 4):
        method.after_backward(model, _output(), torch.tensor(LABELS), {"epoch": epoch})
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    assert method.epoch_statistics() == {}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_an_encoder_without_convolutions_is_reported():
    encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(3, 6)) for m in ("a", "v")})
    model = MultimodalModel(encoders, ConcatFusion(["a", "v"], 6, 2))
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    method = _ogm()
    collect = _Collect()  # on the "dmgl" logger itself: the CLI stops it from propagating to the root
    logging.getLogger("dmgl").addHandler(collect)
    try:
        method.after_backward(model, _output(), torch.tensor(LABELS), {"epoch": 1})
        method.after_backward(model, _output(), torch.tensor(LABELS), {"epoch": 1})
    finally:
        logging.getLogger("dmgl").removeHandler(collect)
    assert all(torch.all(p.grad == 1.0) for p in model.parameters())
    messages = collect.messages
    assert len(messages) == 2 and "params=weights" in messages[0]  # once per modality
