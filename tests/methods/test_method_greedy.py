"""Greedy (Wu et al., ICML 2022) on tiny MMTM models: the conditional learning speed against a hand computation,
the running-average excitation a re-balancing step substitutes, the window and the warm-up epoch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmgl_cli.config import load_config
from dmgl_cli.errors import DmglError
from dmgl_cli.methods import build_method
from dmgl_cli.methods.greedy import CuratedMMTM

SPECS = {
    "a": {"kind": "vector", "dtype": "float32", "shape": [5]},
    "b": {"kind": "vector", "dtype": "float32", "shape": [7]},
}
TINY = [
    "method.name=greedy",
    "strategy.name=constant",
    "strategy.alpha=0",
    "model.encoders.default.hidden=6",
    "model.embed_dim=4",
]


def _method(*settings: str):
    config = load_config("synthetic", [*TINY, *(f"method.options.greedy.{s}" for s in settings)])
    return build_method(config)


def _tiny(*settings: str):
    """(method, model, SGD optimiser, inputs, labels) on the two-modality vector toy."""
    torch.manual_seed(0)
    method = _method(*settings)
    model = method.build_model(SPECS, 3)
    inputs = {"a": torch.randn(8, 5), "b": torch.randn(8, 7)}
    labels = torch.randint(0, 3, (8,))
    return method, model, torch.optim.SGD(model.parameters(), lr=0.1), inputs, labels


def _step(method, model, optimizer, inputs, labels):
    """One training step as dmgl's loop takes it; returns the forward output."""
    output = method.forward(model, inputs, training=True)
    loss = method.classification_loss(output, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward(model, output, labels, {})
    optimizer.step()
    return output


def _hand_effective_updates(model) -> dict[tuple[str, int], float]:
    """sum ||g||^2 / sum ||theta||^2 per group, grouping parameters by name as the authors' compute_BDR does:
    MMTM excitation j -> bypass j, the MMTM's joint squeeze layer -> both bypasses, branch j -> main j."""
    grad_sq: dict[tuple[str, int], float] = {}
    weight_sq: dict[tuple[str, int], float] = {}
    for name, param in model.named_parameters():
        if name.startswith("mmtms."):
            if ".excitations.0." in name:
                groups = [("bypass", 0)]
            elif ".excitations.1." in name:
                groups = [("bypass", 1)]
            else:
                assert ".squeeze." in name
                groups = [("bypass", 0), ("bypass", 1)]
        else:
            groups = [
                ("main", j) for j, m in enumerate("ab") if name.startswith((f"encoders.{m}.", f"fusion.heads.{m}."))
            ]
            assert len(groups) == 1, name
        for group in groups:
            grad = param.grad.double().pow(2).sum().item() if param.grad is not None else 0.0
            grad_sq[group] = grad_sq.get(group, 0.0) + grad
            weight_sq[group] = weight_sq.get(group, 0.0) + param.detach().double().pow(2).sum().item()
    return {group: grad_sq[group] / weight_sq[group] for group in grad_sq}


def _hand_gates(mmtm: CuratedMMTM, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """sigmoid(W_j relu(W [mean over space of each map]) ) per modality, written out."""
    squeezed = torch.cat([f.reshape(f.shape[0], f.shape[1], -1).mean(-1) for f in features], dim=1)
    joint = torch.clamp(squeezed @ mmtm.squeeze.weight.T + mmtm.squeeze.bias, min=0)
    return [torch.sigmoid(joint @ e.weight.T + e.bias) for e in mmtm.excitations]


# --------------------------------------------------------------------------------------- what is measured


def test_conditional_learning_speed_matches_a_hand_computation(registry):
    method, model, optimizer, inputs, labels = _tiny()
    method.on_epoch_start(model, 1)
    bypass, main = [0.0, 0.0], [0.0, 0.0]
    for _ in range(3):
        output = method.forward(model, inputs, training=True)
        loss = method.classification_loss(output, labels)
        # The authors' blend_loss: the sum of the streams' cross-entropies; the prediction is their mean.
        expected = F.cross_entropy(output.unimodal_logits["a"], labels) + F.cross_entropy(
            output.unimodal_logits["b"], labels
        )
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(output.logits, (output.unimodal_logits["a"] + output.unimodal_logits["b"]) / 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(model, output, labels, {})
        ratios = _hand_effective_updates(model)  # before the optimiser step, as the method reads them
        optimizer.step()
        for j in (0, 1):
            bypass[j] += ratios[("bypass", j)]
            main[j] += ratios[("main", j)]
        assert list(method.bypass_speed) == pytest.approx(bypass, rel=1e-5)
        assert list(method.main_speed) == pytest.approx(main, rel=1e-5)
        d_bdr = math.log10(bypass[0] / main[0]) - math.log10(bypass[1] / main[1])
        assert method.d_bdr == pytest.approx(d_bdr, rel=1e-5, abs=1e-9)
    metrics = method.on_epoch_end(model, 1, {})
    assert metrics["greedy_bdr_a"] == pytest.approx(math.log10(bypass[0] / main[0]), rel=1e-5)
    assert metrics["greedy_bdr_b"] == pytest.approx(math.log10(bypass[1] / main[1]), rel=1e-5)
    assert metrics["greedy_curation_steps_a"] == metrics["greedy_curation_steps_b"] == 0.0


# ------------------------------------------------------------------------------------- how it re-balances


@pytest.mark.parametrize("running_average", ["own", "first-modality"])
def test_running_average_excitation_replaces_the_cared_for_gate(running_average):
    torch.manual_seed(1)
    sources = [0, 1] if running_average == "own" else [0, 0]
    mmtm = CuratedMMTM([3, 3], ratio=2, gate_scale=1.0, average_sources=sources, average_eval_batches=False)
    batches = [[torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)] for _ in range(3)]
    batch_means = []
    with torch.no_grad():
        for index, features in enumerate(batches):
            hand = _hand_gates(mmtm, features)
            batch_means.append([g.mean(0) for g in hand])
            mmtm.curated = 0 if index == 2 else None
            out, _ = mmtm(features)
            # The plain mean, over all batches so far including this one, of the batch-mean gate of each
            # average's source modality (the released code: the first modality's for both).
            averages = [torch.stack([means[s] for means in batch_means]).mean(0) for s in sources]
            for j in (0, 1):
                torch.testing.assert_close(mmtm.running_gate(j), averages[j])
        # Curating modality 0: its maps are gated by the running average, modality 1's by its own gate.
        torch.testing.assert_close(out[0], batches[2][0] * averages[0].view(1, 3, 1, 1))
        torch.testing.assert_close(out[1], batches[2][1] * hand[1].view(4, 3, 1, 1))
        mmtm.curated = 1
        features = [torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)]
        before = [mmtm.running_gate(j).clone() for j in (0, 1)]
        mmtm.eval()  # average_eval_batches=false: an evaluation batch leaves the averages alone
        out, _ = mmtm(features)
        torch.testing.assert_close(out[1], features[1] * before[1].view(1, 3, 1, 1))
        torch.testing.assert_close(out[0], features[0] * _hand_gates(mmtm, features)[0].view(4, 3, 1, 1))
        assert all(torch.equal(b, mmtm.running_gate(j)) for j, b in enumerate(before))
        assert int(mmtm.averaged_batches) == 3


def test_rebalancing_window_substitutes_the_average_and_keeps_updating(registry):
    method, model, optimizer, inputs, labels = _tiny("epsilon=0.0", "window=3")
    method.on_epoch_start(model, 2)  # past the warm-up
    _step(method, model, optimizer, inputs, labels)  # normal, measured: |d_BDR| > 0 opens a window
    assert method.curating and method.caring == (0 if method.d_bdr > 0 else 1)
    caring, other = method.caring, 1 - method.caring
    for step in range(3):
        speeds = (method.bypass_speed.copy(), method.main_speed.copy())
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        output = method.forward(model, inputs, training=True)
        for point, mmtm in enumerate(model.mmtms):
            assert mmtm.curated is None  # only during the method's forward
            gates = output.extras["gates"][point]
            torch.testing.assert_close(gates[caring], mmtm.running_gate(caring).expand(8, -1))
            assert not torch.allclose(gates[other], gates[other][:1].expand(8, -1))  # its own, per sample
        loss = method.classification_loss(output, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(model, output, labels, {})
        optimizer.step()
        # Not measured; every parameter but the cared-for excitation layers (whose gate was replaced) moved.
        assert (method.bypass_speed == speeds[0]).all() and (method.main_speed == speeds[1]).all()
        for name, param in model.named_parameters():
            frozen = f".excitations.{caring}." in name
            assert torch.equal(param, weights[name]) == frozen, name
        assert method.curating == (step < 2)
    with torch.no_grad():  # evaluation is never curated
        evaluated = method.forward(model, inputs, training=False)
    gates = evaluated.extras["gates"][0][caring]
    assert not torch.allclose(gates, gates[:1].expand(8, -1))
    speeds = method.bypass_speed.copy()
    _step(method, model, optimizer, inputs, labels)  # the window is over: a normal, measured step
    assert (method.bypass_speed > speeds).all()
    metrics = method.on_epoch_end(model, 2, {})
    assert metrics[f"greedy_curation_steps_{'ab'[caring]}"] == 3.0
    assert metrics[f"greedy_curation_steps_{'ab'[other]}"] == 0.0

    restored = _method("epsilon=0.0", "window=3")
    restored.load_state_dict(method.state_dict())
    assert restored.state_dict() == method.state_dict()


def test_the_first_epoch_is_a_measured_warm_up(registry):
    # starting_epoch=2 (the authors' default, epochs counted from 1): epoch 1 only measures.
    method, model, optimizer, inputs, labels = _tiny("epsilon=0.0")
    method.on_epoch_start(model, 1)
    for _ in range(4):
        _step(method, model, optimizer, inputs, labels)
        assert not method.curating and abs(method.d_bdr) > 0
    assert method.on_epoch_end(model, 1, {})["greedy_curation_steps_a"] == 0.0
    method.on_epoch_start(model, 2)
    _step(method, model, optimizer, inputs, labels)
    assert method.curating

    # starting_epoch=3: two warm-up epochs.
    method, model, optimizer, inputs, labels = _tiny("epsilon=0.0", "starting_epoch=3")
    for epoch in (1, 2):
        method.on_epoch_start(model, epoch)
        for _ in range(3):
            _step(method, model, optimizer, inputs, labels)
            assert not method.curating
    method.on_epoch_start(model, 3)
    _step(method, model, optimizer, inputs, labels)
    assert method.curating


def test_epsilon_keeps_normal_steps_when_the_speeds_are_balanced(registry):
    method, model, optimizer, inputs, labels = _tiny("epsilon=1000.0")
    method.on_epoch_start(model, 2)
    for _ in range(4):
        _step(method, model, optimizer, inputs, labels)
        assert not method.curating


# ---------------------------------------------------------------------------------------------- refusals


def test_greedy_refusals_are_clear(registry):
    three = {**SPECS, "c": {"kind": "vector", "dtype": "float32", "shape": [3]}}
    with pytest.raises(DmglError, match="exactly two modalities"):
        _method().build_model(three, 3)
    config = load_config("synthetic", [*TINY, "model.encoders.a.hidden=4", "model.encoders.b.hidden=6"])
    with pytest.raises(DmglError, match="running_average=own"):
        build_method(config).build_model(SPECS, 3)
    config = load_config(
        "synthetic",
        [*TINY, "model.encoders.a.hidden=4", "model.encoders.b.hidden=6", "method.options.greedy.running_average=own"],
    )
    build_method(config).build_model(SPECS, 3)
    with pytest.raises(DmglError, match="method.options.greedy.training_loss"):
        _method("training_loss=mean")
    with pytest.raises(DmglError, match="method.options.greedy.window"):
        _method("window=0")
    text = {"text": {"kind": "text", "dtype": "int64", "shape": [16]}, "b": SPECS["b"]}
    with pytest.raises(DmglError, match="no Greedy result"):
        _method().build_model(text, 3)
