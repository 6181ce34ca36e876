"""The learning-based strategy's outer step inside the trainer: where its data comes from, what its forward may
change, and what it logs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dmgl_cli.config import load_config
from dmgl_cli.data.loader import hold_out
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.errors import DmglError
from dmgl_cli.train import Trainer, compute_losses
from dmgl_cli.train_setup import build_optimizer

STEP = "strategy.lb.estimator=step"  # v0.2's one-batch estimate at the update step


class NullSink:
    def log_metrics(self, metrics, step):
        pass

    def save_checkpoint(self, name, state):
        pass


def _trainer(overrides=()):
    config = load_config("synthetic", ["train.epochs=2", "train.batch_size=32", "strategy.name=lb", *overrides])
    return Trainer(config, open_dataset("synthetic"), 0, NullSink())


def test_default_outer_data_is_a_stratified_holdout_apart_from_validation(synthetic):
    trainer = _trainer()
    lb = trainer.config.strategy.lb
    assert lb.outer_data == "holdout" and lb.holdout == 0.05
    held, train, val = (set(s.indices.tolist()) for s in (trainer.holdout, trainer.splits.train, trainer.splits.val))
    assert held and not held & train and not held & val
    assert len(held) + len(train) == 405  # 450 training samples minus the 10% validation split
    # stratified: every class of the training split is in the holdout, in proportion
    labels = np.asarray(trainer.holdout.labels)
    assert set(labels.tolist()) == set(np.asarray(trainer.splits.train.labels).tolist())
    assert trainer.outer_step.outer_split() is trainer.holdout
    # the same samples for every training seed: they depend on data.split_seed only
    other_seed = Trainer(trainer.config, open_dataset("synthetic"), 5, NullSink())
    assert np.array_equal(other_seed.holdout.indices, trainer.holdout.indices)


def test_holdout_count_and_errors(synthetic):
    trainer = _trainer()
    kept, held = hold_out(trainer.splits.train, 16, seed=1, transform=None)
    assert len(held) == 16 and len(kept) == len(trainer.splits.train) - 16
    again = hold_out(trainer.splits.train, 16, seed=1, transform=None)[1]
    assert np.array_equal(again.indices, held.indices)  # seeded, in the drawn order
    with pytest.raises(DmglError, match="strategy.lb.holdout"):
        hold_out(trainer.splits.train, len(trainer.splits.train), seed=1, transform=None)
    with pytest.raises(DmglError, match="strategy.lb.holdout must be"):
        load_config("synthetic", ["strategy.lb.holdout=1.5"])
    val_trainer = _trainer(["strategy.lb.outer_data=val"])
    assert val_trainer.holdout is None and val_trainer.outer_step.outer_split() is val_trainer.splits.val


def test_outer_forward_changes_no_running_state_and_is_deterministic(synthetic):
    trainer = _trainer(["strategy.lb.approx=cg", "strategy.lb.terms=3", "strategy.lb.estimator=step"])
    # give one encoder BatchNorm and dropout, the state an outer forward in train mode would touch
    trainer.model.encoders["fast"] = nn.Sequential(nn.BatchNorm1d(32), nn.Dropout(0.5), trainer.model.encoders["fast"])
    trainer.optimizer = build_optimizer(trainer.config, trainer.method, trainer.model)
    batch_norm = trainer.model.encoders["fast"][0]
    batch_norm.running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in batch_norm.state_dict().items()}
    trainer.model.train()
    first = trainer.outer_step.outer_output()[0].logits
    second = trainer.outer_step.outer_output()[0].logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout, no batch statistics
    for key, value in batch_norm.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert trainer.model.training  # the train/eval mode is restored
    # a whole hypergradient leaves the buffers alone too (the inner forward is the training step's own)
    inputs = {m: torch.randn(8, 32) for m in ("fast", "slow")}
    output = trainer.model(inputs)
    after_inner = {k: v.clone() for k, v in batch_norm.state_dict().items()}
    labels = torch.randint(0, 8, (8,))
    cls_loss, mm_loss = compute_losses(trainer.method, trainer.config, output, labels)
    trainer.outer_step.before_backward(output, labels, cls_loss, mm_loss)
    for key, value in batch_norm.state_dict().items():
        assert torch.equal(value, after_inner[key]), key


def test_hypergradient_uses_the_optimisers_weight_decay_and_learning_rate(synthetic, monkeypatch):
    seen = {}
    import dmgl_cli.strategies.estimators as train_module

    real_implicit, real_identity = train_module.implicit_hypergradient, train_module.identity_hypergradient

    def spy_implicit(*args, **kwargs):
        seen["weight_decay"] = kwargs["weight_decay"]
        return real_implicit(*args, **kwargs)

    def spy_identity(mixed, outer, params, scale, *reduce):
        seen["scale"] = scale
        return real_identity(mixed, outer, params, scale, *reduce)

    monkeypatch.setattr(train_module, "implicit_hypergradient", spy_implicit)
    monkeypatch.setattr(train_module, "identity_hypergradient", spy_identity)
    for optimiser, expected in (("sgd", 1e-4), ("adam", 1e-4), ("adamw", 0.0)):
        trainer = _trainer(
            [
                f"optim.name={optimiser}",
                "strategy.lb.update_every=2",
                "strategy.lb.approx=cg",
                "strategy.lb.estimator=step",
            ]
        )
        trainer._train_epoch()
        assert set(seen["weight_decay"]) == {expected}, optimiser  # in H of Eq. 3
        trainer = _trainer([f"optim.name={optimiser}", "strategy.lb.update_every=2", "strategy.lb.estimator=step"])
        trainer._train_epoch()
        assert seen["scale"] == pytest.approx(trainer.optimizer.param_groups[0]["lr"])  # identity, scale auto


@pytest.mark.slow
def test_cg_and_neumann_log_what_they_met(synthetic):
    cg = _trainer(["strategy.lb.approx=cg", "strategy.lb.terms=4", "strategy.lb.update_every=3", STEP])
    metrics = cg._train_epoch()
    assert 1 <= metrics["alpha_hessian_products"] <= 4
    assert 0.0 <= metrics["alpha_cg_negative_curvature"] <= 1.0 and metrics["alpha_cg_residual"] >= 0.0
    neumann = _trainer(
        [
            "strategy.lb.approx=neumann",
            "strategy.lb.terms=4",
            "strategy.lb.update_every=3",
            "strategy.lb.curvature_refresh=100",
            STEP,
        ]
    )
    metrics = neumann._train_epoch()
    assert metrics["alpha_lambda_max"] > 0
    # lambda_max was estimated once (power iterations) and then reused: later updates take only the series
    assert neumann.strategy.eigenvalue_update == 0 and neumann.strategy.updates > 1
    identity = _trainer(["strategy.lb.update_every=3", STEP])
    metrics = identity._train_epoch()
    assert "alpha_hessian_products" not in metrics and "alpha_hypergradient" in metrics


class KeepingSink(NullSink):
    def __init__(self):
        self.checkpoints = {}

    def save_checkpoint(self, name, state):
        self.checkpoints[name] = state


def test_mid_epoch_resume_keeps_the_epochs_hypergradient_records(synthetic):
    from dmgl_cli.errors import Interrupted

    settings = ["strategy.lb.approx=cg", "strategy.lb.terms=3", "strategy.lb.update_every=2", "train.epochs=1", STEP]
    reference = _trainer(settings)
    expected = reference.fit().history[0]
    sink = KeepingSink()
    config = load_config("synthetic", ["train.batch_size=32", "strategy.name=lb", *settings])
    stopped = Trainer(config, open_dataset("synthetic"), 0, sink)
    outer = stopped.outer_step
    assert outer is not None
    original = outer._apply

    def stop_after_two_updates(result):
        original(result)
        stopped.stop_requested = len(outer.records) == 2

    outer._apply = stop_after_two_updates
    with pytest.raises(Interrupted):
        stopped.fit()
    resumed = Trainer(config, open_dataset("synthetic"), 0, NullSink())
    resumed.load_state_dict(sink.checkpoints["last"], "test")
    metrics = resumed.fit().history[0]
    for key in (
        "alpha",
        "alpha_hypergradient",
        "alpha_hessian_products",
        "alpha_cg_residual",
        "alpha_cg_negative_curvature",
        "train_loss",
        "val_acc",
    ):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_a_holdout_that_does_not_fit_the_dataset_creates_no_run(run_cli, synthetic, registry):
    from dmgl_cli.tracking import Tracker

    result = run_cli("train", "--strategy", "lb", "--set", "strategy.lb.holdout=100000", "--epochs", "1", expect=1)
    assert "strategy.lb.holdout asks for 100000 held-out samples" in result.output and "parent run" not in result.output
    assert not (registry / "mlflow.db").exists() or not Tracker().search(
        [e.experiment_id for e in Tracker().client.search_experiments()]
    )


def test_identity_after_the_backward_equals_eq3_identity_before_it(synthetic):
    """The identity hypergradient's outer forward runs after the step's backward (one graph alive at a time); the
    value is the one taken with the inner graph still alive, on a model with BatchNorm whose statistics the inner
    forward updates."""
    from dmgl_cli.hypergradient import identity_hypergradient, implicit_hypergradient, mixed_gradient

    trainer = _trainer(["optim.weight_decay=0.01"])
    trainer.model.encoders["fast"] = nn.Sequential(nn.BatchNorm1d(32), trainer.model.encoders["fast"])
    trainer.optimizer = build_optimizer(trainer.config, trainer.method, trainer.model)
    trainer.model.train()
    generator = torch.Generator().manual_seed(3)
    inputs = {m: torch.randn(16, 32, generator=generator) for m in ("fast", "slow")}
    labels = torch.randint(0, 8, (16,), generator=generator)
    cls_loss, mm_loss = compute_losses(trainer.method, trainer.config, trainer.model(inputs), labels)
    params = trainer.outer_step.hyper_parameters()
    output, outer_labels = trainer.outer_step.outer_output()
    before = implicit_hypergradient(
        cls_loss,
        mm_loss,
        0.3,
        trainer.method.classification_loss(output, outer_labels),
        params,
        "identity",
        0,
        0.05,
        0.0,
    ).value
    mixed = mixed_gradient(cls_loss, mm_loss, params)
    (0.7 * cls_loss + 0.3 * mm_loss).backward()  # frees the inner graph
    output, outer_labels = trainer.outer_step.outer_output()
    after = identity_hypergradient(mixed, trainer.method.classification_loss(output, outer_labels), params, 0.05)
    assert after == before and after != 0.0
