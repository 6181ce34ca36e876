"""MSLR and MSES as in AGM's baseline code, on tiny toys with the expected values computed by hand: per-modality
gradient scaling of the encoder AND its head columns (MSLR), the accuracy-ratio schedule, and the early stop that
zeroes a branch and restores the model (MSES)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dmgl_cli.config import load_config
from dmgl_cli.device import seed_everything
from dmgl_cli.errors import DmglError
from dmgl_cli.methods import build_method

SPECS = {m: {"kind": "vector", "dtype": "float32", "shape": [6]} for m in ("fast", "slow")}
COLUMNS = {"fast": slice(0, 3), "slow": slice(3, 6)}  # embed_dim 3: the head's columns that read each modality


def _method(name: str, *settings: str):
    config = load_config("synthetic", [f"method.name={name}", "strategy.name=constant", "model.embed_dim=3", *settings])
    method = build_method(config)
    seed_everything(0)
    model = method.build_model(SPECS, 4)
    return method, model


def _backward(model, seed: int = 1):
    torch.manual_seed(seed)
    inputs = {m: torch.randn(8, 6) for m in SPECS}
    labels = torch.randint(0, 4, (8,))
    output = model(inputs)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(output.logits, labels).backward()
    return output, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _check_branch_scaling(model, raw: dict[str, torch.Tensor], coefficients: dict[str, float]) -> None:
    for name, param in model.named_parameters():
        if name.startswith("encoders."):
            modality = name.split(".")[1]
            assert torch.equal(param.grad, raw[name] * coefficients[modality]), name
    weight = model.fusion.head.weight.grad
    for modality, columns in COLUMNS.items():
        assert torch.equal(weight[:, columns], raw["fusion.head.weight"][:, columns] * coefficients[modality])
    assert torch.equal(model.fusion.head.bias.grad, raw["fusion.head.bias"])  # the shared bias keeps the global rate


# ----------------------------------------------------------------------------------------------------------- MSLR


def test_mslr_scales_each_branch_and_its_head_columns(registry):
    method, model = _method("mslr", "method.options.mslr.lr_scale={fast: 0.5, slow: 2.0}")
    optimizer = torch.optim.SGD(method.param_groups(model), lr=0.1)
    method.attach(SimpleNamespace(optimizer=optimizer))
    method.dynamic = {"fast": 1.5}  # as if the accuracy ratio had been measured: coeff_fast = 0.5 * 1.5
    output, labels = _backward(model)
    raw, before = _grads(model), {n: p.detach().clone() for n, p in model.named_parameters()}
    method.after_backward(model, output, labels, {"epoch": 1})
    _check_branch_scaling(model, raw, {"fast": 0.75, "slow": 2.0})
    optimizer.step()  # plain SGD: each branch moved by coeff_j * lr * its gradient
    head = model.fusion.head.weight.detach()
    assert torch.allclose(
        head[:, COLUMNS["slow"]],
        before["fusion.head.weight"][:, COLUMNS["slow"]] - 0.1 * 2.0 * raw["fusion.head.weight"][:, 3:],
    )
    encoder = "encoders.fast." + next(n for n, _ in model.encoders["fast"].named_parameters())
    assert torch.allclose(dict(model.named_parameters())[encoder].detach(), before[encoder] - 0.1 * 0.75 * raw[encoder])

    # Outside the modulation window (epochs 1-20 by default) nothing is scaled.
    output, labels = _backward(model, seed=2)
    raw = _grads(model)
    method.after_backward(model, output, labels, {"epoch": 21})
    _check_branch_scaling(model, raw, {"fast": 1.0, "slow": 1.0})


def test_mslr_accuracy_ratio_schedule_by_hand(registry):
    method, model = _method("mslr", "method.options.mslr.window=2", "method.options.mslr.lr_scale={slow: 1.1}")
    method.param_groups(model)
    accuracies = {"fast": [0.5, 0.6, 0.7, 0.65], "slow": [0.2, 0.3, 0.2, 0.4]}
    expected = {"fast": [1.0, 1.0, 0.7 / 0.55, 0.65 / 0.65], "slow": [1.0, 1.0, 0.2 / 0.25, 0.4 / 0.25]}
    for epoch in range(4):
        method.on_epoch_end(model, epoch + 1, {f"val_acc_{m}": a[epoch] for m, a in accuracies.items()})
        for modality in SPECS:  # the ratio in force for the NEXT epoch: this accuracy / mean of the last two stored
            assert method.dynamic.get(modality, 1.0) == pytest.approx(expected[modality][epoch])
    assert method.coefficients_for(5) == pytest.approx({"fast": 1.0, "slow": 1.1 * 0.4 / 0.25})
    assert method.coefficients_for(21) == {"fast": 1.0, "slow": 1.0}

    keep, model = _method("mslr", "method.options.mslr.schedule=keep")
    keep.param_groups(model)
    keep.on_epoch_end(model, 1, {"val_acc_fast": 0.5})
    keep.on_epoch_end(model, 2, {"val_acc_fast": 0.9})
    assert keep.dynamic == {}


def test_mslr_learning_rate_mode_uses_parameter_groups(registry):
    method, model = _method(
        "mslr", "method.options.mslr.scaling=learning-rate", "method.options.mslr.lr_scale={fast: 0.5, slow: 2.0}"
    )
    groups = method.param_groups(model)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    method.attach(SimpleNamespace(optimizer=optimizer))
    method.dynamic = {"slow": 0.5}
    method.start_of_epoch(model, 1)
    rates = {g["modality"]: g["lr"] for g in optimizer.param_groups}
    assert rates == pytest.approx({None: 0.1, "fast": 0.05, "slow": 0.1})
    assert any(p is model.fusion.head.weight for p in optimizer.param_groups[0]["params"])  # head: global rate
    output, labels = _backward(model)
    raw = _grads(model)
    method.after_backward(model, output, labels, {"epoch": 1})
    assert all(torch.equal(p.grad, raw[n]) for n, p in model.named_parameters())  # no gradient scaling there


# ----------------------------------------------------------------------------------------------------------- MSES


def test_mses_zeroes_a_stopped_branch_including_its_head_columns(registry):
    method, model = _method("mses")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    method.attach(SimpleNamespace(optimizer=optimizer))
    method.frozen = {"slow": 2}
    output, labels = _backward(model)
    raw, before = _grads(model), {n: p.detach().clone() for n, p in model.named_parameters()}
    method.after_backward(model, output, labels, {"epoch": 3})
    _check_branch_scaling(model, raw, {"fast": 1.0, "slow": 0.0})
    assert all(p.grad is not None for p in model.encoders["slow"].parameters())  # zeroed, not dropped
    optimizer.step()
    # As in the code, a zero gradient still lets weight decay move the stopped branch: theta <- theta (1 - lr wd).
    for name, param in model.encoders["slow"].named_parameters():
        assert torch.allclose(param.detach(), before[f"encoders.slow.{name}"] * (1 - 0.1 * 0.01))

    output, labels = _backward(model, seed=2)
    raw = _grads(model)
    method.after_backward(model, output, labels, {"epoch": 21})  # outside the window: the branch trains again
    _check_branch_scaling(model, raw, {"fast": 1.0, "slow": 1.0})


def _train_a_little(model, optimizer, seed: int) -> None:
    _backward(model, seed)
    optimizer.step()


def test_mses_stops_on_the_smoothed_loss_and_restores_the_whole_model(registry):
    method, model = _method("mses", "method.options.mses.patience=1")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method.attach(SimpleNamespace(optimizer=optimizer))
    raw = {"fast": [1.0, 0.8, 0.7], "slow": [1.0, 1.2, 1.1]}
    # By hand: smoothed = raw in epoch 1, then 0.6 * previous raw + 0.4 * current raw.
    smoothed = {
        "fast": [1.0, 0.6 * 1.0 + 0.4 * 0.8, 0.6 * 0.8 + 0.4 * 0.7],
        "slow": [1.0, 0.6 * 1.0 + 0.4 * 1.2, 0.6 * 1.2 + 0.4 * 1.1],
    }
    saved = {}
    for epoch in (1, 2, 3):
        method.start_of_epoch(model, epoch)
        _train_a_little(model, optimizer, seed=epoch)
        method.validation_losses = lambda model, e=epoch: {m: raw[m][e - 1] for m in raw}
        metrics = method.on_epoch_end(model, epoch, {})
        saved[epoch] = (
            {k: v.clone() for k, v in model.state_dict().items()},
            {i: s["momentum_buffer"].clone() for i, s in optimizer.state_dict()["state"].items()},
        )
        for modality in raw:
            assert metrics[f"mses_val_loss_{modality}"] == pytest.approx(smoothed[modality][epoch - 1])
    # fast improved in every epoch; slow's best is epoch 1 and 3 - 1 > patience 1: it stops after epoch 3.
    assert method.best_epoch == {"fast": 3, "slow": 1}
    assert metrics["mses_frozen_slow"] == 1.0 and metrics["mses_stop_epoch_slow"] == 3.0
    assert metrics["mses_frozen_fast"] == 0.0

    optimizer.param_groups[0]["lr"] = 0.01  # as a scheduler would have lowered it
    method.start_of_epoch(model, 4)
    # The WHOLE model (both encoders, the head) and the momentum are back at slow's best epoch; the rate is kept.
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[1][0][key]), key
    for index, state in optimizer.state_dict()["state"].items():
        assert torch.equal(state["momentum_buffer"], saved[1][1][index])
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert set(method.snapshots) == {3}  # only fast's best epoch can still be returned to


def test_mses_branch_restore_puts_back_only_the_stopped_branch(registry):
    method, model = _method("mses", "method.options.mses.patience=0", "method.options.mses.restore=branch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method.attach(SimpleNamespace(optimizer=optimizer))
    losses = {1: {"fast": 1.0, "slow": 1.0}, 2: {"fast": 0.5, "slow": 2.0}}
    for epoch in (1, 2):
        method.start_of_epoch(model, epoch)
        _train_a_little(model, optimizer, seed=epoch)
        if epoch == 1:
            at_best = {k: v.clone() for k, v in model.state_dict().items()}
        method.validation_losses = lambda model, e=epoch: losses[e]
        method.on_epoch_end(model, epoch, {})
    current = {k: v.clone() for k, v in model.state_dict().items()}
    assert method.frozen == {"slow": 2}
    method.start_of_epoch(model, 3)
    state = model.state_dict()
    for key in state:
        if key.startswith("encoders.slow."):
            assert torch.equal(state[key], at_best[key]), key
        elif key.startswith("encoders.fast."):
            assert torch.equal(state[key], current[key]), key
    head = state["fusion.head.weight"]
    assert torch.equal(head[:, COLUMNS["slow"]], at_best["fusion.head.weight"][:, COLUMNS["slow"]])
    assert torch.equal(head[:, COLUMNS["fast"]], current["fusion.head.weight"][:, COLUMNS["fast"]])


@pytest.mark.parametrize(
    ("name", "setting", "value"),
    [
        ("mses", "restore", "true"),
        ("mses", "end_epoch", "0"),
        ("mslr", "scaling", "lr"),
        ("mslr", "window", "0"),
    ],
)
def test_bad_settings_are_refused(registry, name, setting, value):
    with pytest.raises(DmglError, match=f"method.options.{name}.{setting}"):
        _method(name, f"method.options.{name}.{setting}={value}")
