"""AGM against the authors' code (lihong2303/AGM_ICCV2023): eval-mode padded passes, the Shapley responses
without an f(0, 0) term, the coefficients and their window, and the conditional clip — each checked by hand on a
toy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dmgl_cli.config import load_config
from dmgl_cli.methods import build_method
from dmgl_cli.models import ModelOutput, MultimodalModel
from dmgl_cli.models.fusion import ConcatFusion


def _agm(*overrides: str):
    config = load_config("synthetic", ["method.name=agm", *(f"method.options.agm.{o}" for o in overrides)])
    return build_method(config)


def _batchnorm_model() -> MultimodalModel:
    torch.manual_seed(0)
    encoders = nn.ModuleDict(
        {
            m: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 6))
            for m in ("a", "v")
        }
    )
    return MultimodalModel(encoders, ConcatFusion(["a", "v"], 6, 3))


class TableModel(nn.Module):
    """Logits that depend only on which inputs are present (non-zero): one learnable vector per coalition."""

    modalities = ["a", "v"]

    def __init__(self, table: dict[str, torch.Tensor], modalities: list[str] | None = None):
        super().__init__()
        if modalities is not None:
            self.modalities = modalities
        self.table = nn.ParameterDict({key: nn.Parameter(value.clone()) for key, value in table.items()})

    def forward(self, inputs):
        present = "".join(m for m in self.modalities if inputs[m].abs().sum() > 0) or "none"
        batch = next(iter(inputs.values())).shape[0]
        return ModelOutput(
            logits=self.table[present].expand(batch, -1),
            unimodal_logits={},
            embeddings={m: inputs[m] for m in self.modalities},
        )


def test_padded_passes_leave_batchnorm_statistics_as_a_plain_forward():
    model, reference = _batchnorm_model(), _batchnorm_model()
    model.train()
    reference.train()
    torch.manual_seed(1)
    inputs = {m: torch.randn(16, 4) + 3.0 for m in ("a", "v")}  # far from the zero padding
    method = _agm()
    torch.manual_seed(2)
    output = method.forward(model, inputs, training=True)
    torch.manual_seed(2)  # the same dropout draws for the real-data pass
    plain = reference(inputs)
    for (name, buffer), (_, expected) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(buffer, expected), name  # running mean/var and batch count: real data only
    assert all(module.training for module in model.modules())  # train mode restored
    # The prediction is f(a, v): the responses sum to the real-data logits.
    assert torch.allclose(output.logits, plain.logits, atol=1e-6)
    # A padded pass in train mode would have moved them (what the test guards against).
    moved = copy.deepcopy(reference)
    moved({"a": inputs["a"], "v": torch.zeros_like(inputs["v"])})
    assert not torch.equal(moved.encoders["v"][1].running_mean, reference.encoders["v"][1].running_mean)


def test_responses_are_the_authors_half_differences_without_f00():
    table = {
        "av": torch.tensor([1.0, 2.0, -1.0]),
        "a": torch.tensor([0.5, 0.0, 3.0]),
        "v": torch.tensor([-2.0, 1.0, 0.0]),
        "none": torch.tensor([7.0, -7.0, 5.0]),
    }
    model = TableModel(table)
    inputs = {"a": torch.ones(2, 3), "v": torch.ones(2, 3)}
    method = _agm()
    output = method.forward(model, inputs, training=True)
    # m_a = (f(a,v) - f(0,v) + f(a,0)) / 2, m_v = (f(a,v) - f(a,0) + f(0,v)) / 2; f(0,0) plays no part.
    f = {key: value.tolist() for key, value in table.items()}
    expected_a = [(av - v + a) / 2 for av, a, v in zip(f["av"], f["a"], f["v"], strict=True)]
    expected_v = [(av - a + v) / 2 for av, a, v in zip(f["av"], f["a"], f["v"], strict=True)]
    assert output.unimodal_logits["a"][0].tolist() == pytest.approx(expected_a)
    assert output.unimodal_logits["v"][1].tolist() == pytest.approx(expected_v)
    assert output.logits[0].tolist() == pytest.approx([1.0, 2.0, -1.0])  # out = m_a + m_v = f(a, v)

    # The backward pass scales what flows through m_a by coeff_a and through m_v by coeff_v.
    method.coefficients.update(a=2.0, v=0.5)
    weights = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])
    (output.logits * weights).sum().backward()
    upstream = weights.sum(dim=0)
    grads = {key: p.grad for key, p in model.table.items()}
    assert torch.allclose(grads["av"], 0.5 * (2.0 + 0.5) * upstream)
    assert torch.allclose(grads["a"], 0.5 * (2.0 - 0.5) * upstream)
    assert torch.allclose(grads["v"], 0.5 * (0.5 - 2.0) * upstream)
    assert grads["none"] is None  # the all-zero pass is not part of the responses


def test_three_modalities_match_the_authors_ur_funny_formula():
    torch.manual_seed(3)
    keys = ["avt", "av", "at", "vt", "a", "v", "t"]
    table = {k: torch.randn(4) for k in keys} | {"none": torch.randn(4)}
    model = TableModel(table, modalities=["a", "v", "t"])
    inputs = {m: torch.ones(1, 2) for m in ("a", "v", "t")}
    output = _agm().forward(model, inputs, training=False)
    f = {k: table[k] for k in keys}
    # model/URFunny_net.py, Modality_Text: pad_x_out is f without x, pad_x_y_out is f with only the third modality.
    text = (f["avt"] - f["av"] + f["t"]) / 3 + (f["at"] - f["v"] + f["vt"] - f["a"]) / 6
    audio = (f["avt"] - f["vt"] + f["a"]) / 3 + (f["at"] - f["v"] + f["av"] - f["t"]) / 6
    assert torch.allclose(output.unimodal_logits["t"][0], text, atol=1e-6)
    assert torch.allclose(output.unimodal_logits["a"][0], audio, atol=1e-6)
    assert torch.allclose(output.logits[0], f["avt"], atol=1e-6)


def _score(logits: list[list[float]], labels: list[int]) -> float:
    """Mean cross-entropy, by hand."""
    total = 0.0
    for row, label in zip(logits, labels, strict=True):
        total += -(row[label] - math.log(sum(math.exp(x) for x in row)))
    return total / len(labels)


def _output(a: list[list[float]], v: list[list[float]]) -> ModelOutput:
    phis = {"a": torch.tensor(a), "v": torch.tensor(v)}
    return ModelOutput(logits=phis["a"] + phis["v"], unimodal_logits=phis, embeddings={})


def test_coefficients_follow_the_running_scores_by_hand():
    method = _agm("alpha=1.5", "end_epoch=2")
    labels = [0, 1]
    first = ([[2.0, 0.0], [0.0, 1.0]], [[0.2, 0.0], [0.0, 0.1]])  # audio ahead
    second = ([[1.0, 0.0], [0.5, 0.2]], [[0.0, 1.0], [0.0, 3.0]])
    method.extra_losses(_output(*first), torch.tensor(labels), {"epoch": 1})
    s_a, s_v = _score(first[0], labels), _score(first[1], labels)
    # Running means start at 0: optimal ratio 1; ratio_a = exp(s_v - s_a).
    assert method.coefficients["a"] == pytest.approx(math.exp(1.5 * (1.0 - math.exp(s_v - s_a))))
    assert method.coefficients["v"] == pytest.approx(math.exp(1.5 * (1.0 - math.exp(s_a - s_v))))
    assert method.coefficients["a"] < 1.0 < method.coefficients["v"]

    method.extra_losses(_output(*second), torch.tensor(labels), {"epoch": 2})
    t_a, t_v = _score(second[0], labels), _score(second[1], labels)
    # The running means are the first step's scores (updated after the coefficients).
    expected_a = math.exp(1.5 * (math.exp(s_v - s_a) - math.exp(t_v - t_a)))
    assert method.coefficients["a"] == pytest.approx(expected_a)
    assert method.running_scores["a"] == pytest.approx((s_a + t_a) / 2)
    held = dict(method.coefficients)

    # After the window the last coefficients stay (the authors' hooks keep their scale); the means still move.
    method.extra_losses(_output(*first), torch.tensor(labels), {"epoch": 3})
    assert method.coefficients == held and method.iterations == 3
    released = _agm("end_epoch=1", "hold_after_window=false")
    released.extra_losses(_output(*first), torch.tensor(labels), {"epoch": 1})
    released.extra_losses(_output(*first), torch.tensor(labels), {"epoch": 2})
    assert released.coefficients == {"a": 1.0, "v": 1.0}
    before = _agm("start_epoch=2", "end_epoch=3")
    before.extra_losses(_output(*first), torch.tensor(labels), {"epoch": 1})
    assert before.coefficients == {"a": 1.0, "v": 1.0}


def test_the_exponent_is_capped():
    method = _agm("alpha=2.0", "cap=0.1")
    labels = torch.tensor([0])
    method.extra_losses(_output([[0.0, 9.0]], [[9.0, 0.0]]), labels, {"epoch": 1})  # audio far behind
    assert method.coefficients["a"] == pytest.approx(math.exp(2.0 * 0.1))


def _concat_with_grads(head_value: float, encoder_value: float) -> MultimodalModel:
    model = _batchnorm_model()
    for name, param in model.named_parameters():
        param.grad = torch.full_like(param, head_value if name.startswith("fusion.") else encoder_value)
    return model


def test_gradients_are_clipped_only_when_the_head_gradient_leaves_minus_one_one():
    method = _agm()
    step = {"epoch": 1}
    triggered = _concat_with_grads(head_value=1.5, encoder_value=0.2)
    before = {n: p.grad.clone() for n, p in triggered.named_parameters()}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in before.values()))
    method.after_backward(triggered, None, None, step)
    for name, param in triggered.named_parameters():
        assert torch.allclose(param.grad, before[name] / norm, rtol=1e-5), name  # clip to total norm 1.0
    # Within [-1, 1] nothing is clipped, however large the total norm.
    calm = _concat_with_grads(head_value=1.0, encoder_value=30.0)
    method.after_backward(calm, None, None, step)
    assert all(torch.all(p.grad == (1.0 if n.startswith("fusion.") else 30.0)) for n, p in calm.named_parameters())
    assert method.epoch_statistics()["agm_clipped"] == 0.5
    off = _concat_with_grads(head_value=1.5, encoder_value=0.2)
    _agm("clip=false").after_backward(off, None, None, step)
    assert all(torch.all(p.grad == (1.5 if n.startswith("fusion.") else 0.2)) for n, p in off.named_parameters())
