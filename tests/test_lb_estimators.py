"""Ours-LB's epoch-level estimators against what alpha does: the epoch replayed from a snapshot at alpha +- eps."""

from __future__ import annotations

import copy

import pytest
import torch

from dmgl_cli.config import load_config
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.device import to_device
from dmgl_cli.errors import Interrupted
from dmgl_cli.train import Trainer


class KeepingSink:
    def __init__(self):
        self.checkpoints = {}

    def log_metrics(self, metrics, step):
        pass

    def save_checkpoint(self, name, state):
        self.checkpoints[name] = state


def _trainer(settings, seed=0):
    config = load_config(
        "synthetic", ["train.epochs=3", "train.batch_size=32", "strategy.name=lb", "optim.scheduler=none", *settings]
    )
    return Trainer(config, open_dataset("synthetic"), seed, KeepingSink())


def _outer_loss(trainer) -> float:
    split = trainer.outer_step.outer_split()
    inputs, labels = to_device(split.__getitems__(list(range(len(split)))), trainer.device)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.method.classification_loss(trainer.method.forward(trainer.model, inputs, training=False), labels)
    trainer.model.train()
    return float(loss)


def _epoch_at(trainer, snapshot, alpha):
    trainer.load_state_dict(copy.deepcopy(snapshot), "test")
    trainer.strategy.start_epoch(trainer.epoch, trainer.config.train.epochs)
    trainer.strategy._alpha = alpha
    trainer._train_epoch()
    return _outer_loss(trainer)


def _after_one_epoch(settings):
    """(the estimator's value over epoch 2, the central difference of the outer loss over the same epoch). The
    difference is taken at two step sizes and must agree: training can amplify a tiny change of alpha chaotically
    (bench/README.md, lb_replay.py), and then no derivative describes a finite change; this run is not such a one."""
    trainer = _trainer(settings)
    trainer._train_epoch()  # epoch 1 moves the weights away from the initialisation
    trainer.epoch = 1
    snapshot = copy.deepcopy(trainer.state_dict())
    alpha = trainer.strategy.alpha
    trainer.load_state_dict(copy.deepcopy(snapshot), "test")
    trainer._train_epoch()
    value = float(trainer.strategy.last_hypergradient)
    differences = [
        (_epoch_at(trainer, snapshot, alpha + eps) - _epoch_at(trainer, snapshot, alpha - eps)) / (2 * eps)
        for eps in (1e-3, 3e-3)
    ]
    assert differences[0] == pytest.approx(differences[1], rel=0.02)  # smooth in alpha at this scale
    return value, differences[0]


def test_forward_mode_is_the_derivative_of_the_outer_loss_over_the_epoch(synthetic):
    """With SGD and momentum, forward mode with its curvature term and every step's g_MM - g_CLS is exact: it
    equals the central difference of the outer loss after the epoch, replayed at alpha +- eps."""
    value, difference = _after_one_epoch(["strategy.lb.estimator=forward", "strategy.lb.mixed_every=1"])
    assert value == pytest.approx(difference, rel=0.02)
    assert abs(difference) > 1e-3  # alpha matters here, so the agreement says something


def test_first_order_epoch_estimate_drops_the_curvature_and_is_off(synthetic):
    """Without H Z the same epoch is mis-measured (bench/lb_replay.py: 58% of signs on synthetic): the first-order
    value differs from the replayed effect by far more than forward mode's 2%."""
    value, difference = _after_one_epoch(["strategy.lb.estimator=epoch", "strategy.lb.mixed_every=1"])
    assert value != pytest.approx(difference, rel=0.2)


def test_sampled_steps_are_an_unbiased_estimate_of_every_steps_sum(synthetic):
    """Sampling every k-th step from an offset and weighting by k: the mean over the k offsets is the value with
    every step (training itself is unchanged by the sampling, so each offset sees the same steps)."""
    full = _trainer(["strategy.lb.estimator=epoch", "strategy.lb.mixed_every=1"])
    full._train_epoch()
    expected = full.strategy.last_hypergradient
    values = []
    for offset in range(3):
        sampled = _trainer(["strategy.lb.estimator=epoch", "strategy.lb.mixed_every=3"])
        outer = sampled.outer_step
        steps = len(sampled.train_loader)
        original = outer.epoch_start

        def fixed_offset(steps_in_epoch, resumed_mid_epoch, outer=outer, original=original, offset=offset):
            original(steps_in_epoch, resumed_mid_epoch)
            outer._sampled = set(range(offset, steps_in_epoch, 3))

        outer.epoch_start = fixed_offset
        sampled._train_epoch()
        values.append(sampled.strategy.last_hypergradient)
        assert outer.records[-1].samples == len(range(offset, steps, 3))
    assert sum(values) / 3 == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("estimator", ["epoch", "forward"])
def test_mid_epoch_resume_keeps_the_estimators_accumulators(synthetic, estimator):
    settings = [f"strategy.lb.estimator={estimator}", "strategy.lb.mixed_every=2", "train.epochs=1"]
    expected = _trainer(settings).fit().history[0]
    stopped = _trainer(settings)
    outer = stopped.outer_step
    original = outer.after_optimizer_step

    def stop_half_way():
        original()
        stopped.stop_requested = outer.step_in_epoch == 5

    outer.after_optimizer_step = stop_half_way
    with pytest.raises(Interrupted):
        stopped.fit()
    resumed = _trainer(settings)
    resumed.load_state_dict(stopped.sink.checkpoints["last"], "test")
    metrics = resumed.fit().history[0]
    for key in ("alpha", "alpha_hypergradient", "alpha_hypergradient_snr", "alpha_mixed_samples", "val_acc"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


def test_fixed_sign_control_computes_the_estimate_but_walks_down(synthetic):
    trainer = _trainer(["strategy.lb.direction=fixed", "strategy.lb.estimator=epoch"])
    history = trainer.fit().history
    assert [round(h["alpha"], 6) for h in history] == [0.45, 0.4, 0.35]  # Adam on +1: alpha_lr per epoch
    assert all("alpha_hypergradient" in h for h in history)  # what the hypergradient said is still logged


@pytest.mark.parametrize("estimator", ["epoch", "forward"])
def test_run_horizon_carries_z_across_epochs_and_through_a_resume(synthetic, estimator):
    settings = [f"strategy.lb.estimator={estimator}", "strategy.lb.horizon=run", "strategy.lb.mixed_every=2"]
    expected = _trainer(settings).fit().history
    per_epoch = _trainer([f"strategy.lb.estimator={estimator}", "strategy.lb.mixed_every=2"]).fit().history
    # the first epoch is the same measurement; later ones also count the earlier epochs' shift of alpha
    assert expected[0]["alpha_hypergradient"] == pytest.approx(per_epoch[0]["alpha_hypergradient"], rel=1e-9)
    assert expected[1]["alpha_hypergradient"] != pytest.approx(per_epoch[1]["alpha_hypergradient"], rel=1e-3)
    stopped = _trainer(settings)
    outer = stopped.outer_step
    original = outer.epoch_end

    def stop_after_the_first_epoch():
        metrics = original()
        stopped.stop_requested = True  # honoured after the epoch's checkpoint
        return metrics

    outer.epoch_end = stop_after_the_first_epoch
    with pytest.raises(Interrupted):
        stopped.fit()
    assert stopped.epoch == 1 and stopped.sink.checkpoints["last"]["outer_step"]["groups"]
    resumed = _trainer(settings)
    resumed.load_state_dict(stopped.sink.checkpoints["last"], "test")
    history = resumed.fit().history
    for got, want in zip(history, expected, strict=True):
        assert got["alpha_hypergradient"] == pytest.approx(want["alpha_hypergradient"], rel=1e-6), got
        assert got["alpha"] == pytest.approx(want["alpha"], rel=1e-9)


def test_alpha_zero_throughout_computes_no_matching_loss_and_trains_the_same(synthetic, monkeypatch):
    """Concat (constant 0): L_MM is neither computed nor logged, and the run equals one that computes it (0 x L_MM
    adds nothing to the gradient)."""
    import dmgl_cli.train as train_module

    calls = []
    real = train_module.compute_losses

    def counting(method, config, output, labels, matching=True):
        calls.append(matching)
        return real(method, config, output, labels, matching)

    monkeypatch.setattr(train_module, "compute_losses", counting)
    skipping = _trainer(["strategy.name=constant", "strategy.alpha=0", "train.epochs=2"])
    assert not skipping.computes_matching and skipping.outer_step is None
    skipped = skipping.fit().history
    assert calls and not any(calls[: len(skipping.train_loader)])  # training steps asked for no L_MM
    assert "alpha" not in skipped[0] and "train_mm_loss" not in skipped[0]
    computing = _trainer(["strategy.name=constant", "strategy.alpha=0", "train.epochs=2"])
    computing.computes_matching = True  # what every run did before
    computed = computing.fit().history
    for got, want in zip(skipped, computed, strict=True):
        for key in ("train_loss", "train_cls_loss", "val_acc", "val_cls_loss", "test_acc"):
            if key in want:
                assert got[key] == want[key], key


def test_the_released_rule_draws_its_outer_batch_once_with_the_training_transform(synthetic):
    trainer = Trainer(
        load_config("synthetic", ["train.epochs=2", "method.name=dmgl-official", "strategy.name=lb"]),
        open_dataset("synthetic"),
        0,
        KeepingSink(),
    )
    outer = trainer.outer_step
    first = outer.alpha_gradient()
    batch = outer._batch
    assert outer.alpha_gradient() == first and outer._batch is batch  # the same tensor, reused
    held = trainer.holdout
    expected = held.__getitems__(list(range(8)))  # the first outer_batch_size held-out samples
    assert torch.equal(batch["indices"], expected["indices"]) and torch.equal(batch["labels"], expected["labels"])
