"""``train.compile``: the model's forward through torch.compile (inductor, on the CPU here), in place.

Compiled training matches eager training to float tolerance; the learning-based strategy's hypergradient steps, which
differentiate their forward more than once, run uncompiled with one warning; checkpoints load with or without it.
Compiling is the slow part (tens of seconds the first time on 2 cores, then inductor's on-disk cache): the tests
share one model architecture, whose compiled graphs torch reuses across trainers in the process.
"""

from __future__ import annotations

import io
import logging
import re

import numpy as np
import pytest
import torch

from dmgl_cli.config import load_config, recorded_params
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.run import scoring
from dmgl_cli.tracking import Tracker
from dmgl_cli.train import Trainer

# Measured on the synthetic recipe: compiled and eager histories of 2 epochs differ by at most 4.1e-7 (losses, metrics
# and alpha; identity and cg) and 3.8e-6 (cg's relative residual): inductor fuses and reorders float32 reductions.
TOLERANCE = 1e-4
SETTINGS = ["train.epochs=2", "train.batch_size=64"]
# Figures that are timings, not results.
TIMINGS = {"epoch_seconds", "train_samples_per_s"}


class CheckpointSink:
    """Keeps each checkpoint as it would be written to disk (serialised, so that later steps do not change it)."""

    def __init__(self):
        self.checkpoints: dict[str, list[dict]] = {}

    def log_metrics(self, metrics, step):
        pass

    def save_checkpoint(self, name, state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        self.checkpoints.setdefault(name, []).append(torch.load(buffer, weights_only=True))


@pytest.fixture(autouse=True, scope="module")
def _reset_dynamo():
    yield
    torch._dynamo.reset()  # other test modules start without this module's compiled graphs


def _trainer(overrides=(), compile_=False) -> Trainer:
    config = load_config("synthetic", [*SETTINGS, *overrides, f"train.compile={str(compile_).lower()}"])
    return Trainer(config, open_dataset("synthetic"), 0, CheckpointSink())


def _assert_histories_close(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for epoch, (a, b) in enumerate(zip(first, second, strict=True), start=1):
        assert set(a) == set(b)
        for key in set(a) - TIMINGS:
            assert a[key] == pytest.approx(b[key], abs=TOLERANCE, rel=TOLERANCE), (epoch, key)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_checkpoints_cross_load(synthetic, caplog):
    # the recipe's strategy: lb, approx=identity, update_every=epoch (one hypergradient step per epoch)
    eager = _trainer()
    eager_result = eager.fit()
    with caplog.at_level(logging.WARNING, logger="dmgl"):
        compiled = _trainer(compile_=True)
        compiled_result = compiled.fit()
    assert compiled.config.train.compile and compiled.model._compiled_call_impl is not None
    assert type(compiled.model) is type(eager.model)  # compiled in place: the same class and submodules
    _assert_histories_close(compiled_result.history, eager_result.history)
    assert compiled_result.best_epoch == eager_result.best_epoch
    # the hypergradient steps' forwards run uncompiled, said once for the run (2 such steps here)
    warnings = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(warnings) == 1 and "uncompiled" in warnings[0] and "approx=identity" in warnings[0]

    # checkpoints carry the uncompiled model's keys (no _orig_mod. prefix), so each loads into the other
    sink = compiled.sink
    assert isinstance(sink, CheckpointSink)
    for state in (*sink.checkpoints["last"], *sink.checkpoints["best"]):
        assert list(state["model"]) == list(eager.model.state_dict())
    # resume at epoch 1: compiled from an eager checkpoint, eager from a compiled one; both end where the runs did
    eager_sink = eager.sink
    assert isinstance(eager_sink, CheckpointSink)
    for checkpoint, compile_ in ((eager_sink.checkpoints["last"][0], True), (sink.checkpoints["last"][0], False)):
        resumed = _trainer(compile_=compile_)
        resumed.load_state_dict(checkpoint, "epoch 1")
        assert resumed.epoch == 1
        _assert_histories_close(resumed.fit().history, eager_result.history)


@pytest.mark.slow
def test_second_order_hypergradients_run_uncompiled(synthetic, caplog):
    cg = ["strategy.lb.approx=cg", "strategy.lb.terms=3", "strategy.lb.update_every=2", "strategy.lb.estimator=step"]
    eager = _trainer(cg)
    eager_metrics = eager._train_epoch()
    with caplog.at_level(logging.WARNING, logger="dmgl"):
        compiled = _trainer(cg, compile_=True)
        compiled_metrics = compiled._train_epoch()  # 3 hypergradient steps, each with Hessian-vector products
    warnings = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(warnings) == 1 and "approx=cg" in warnings[0] and "Hessian-vector products" in warnings[0]
    _assert_histories_close([compiled_metrics], [eager_metrics])
    assert compiled.strategy.alpha == pytest.approx(eager.strategy.alpha, abs=TOLERANCE)
    assert compiled.strategy.alpha != pytest.approx(0.5)  # alpha moved (from the recipe's initial 0.5)

    # dmgl-official's released rule: H g_CLS on the outer batch before each epoch
    official = _trainer(["method.name=dmgl-official"], compile_=True)
    reference = _trainer(["method.name=dmgl-official"])
    with caplog.at_level(logging.WARNING, logger="dmgl"):
        value = official.outer_step.alpha_gradient()
    assert value == pytest.approx(reference.outer_step.alpha_gradient(), abs=1e-6, rel=1e-5)
    assert any("approx=official" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_eval_of_a_compiled_run(run_cli, synthetic):
    result = run_cli("train", "--set", "train.epochs=1", "--set", "train.batch_size=64", "--set", "train.compile=true")
    parent_id = re.search(r"parent run ([0-9a-f]{32})", result.output).group(1)
    tracker = Tracker()
    child = tracker.children(parent_id)[0]
    assert child.params["train.compile"] == "True"
    assert "train.compile" in recorded_params(load_config("synthetic"))
    # dmgl eval rebuilds the model uncompiled from config.yaml and loads the compiled run's checkpoint
    out = run_cli("eval", child.run_id)
    assert "Traceback" not in out.output
    outcome = scoring.evaluate_run(child.run_id, tracker=tracker, checkpoint="best", split="test")[0]
    assert outcome.max_abs_diff is not None and outcome.max_abs_diff <= TOLERANCE
    for key in ("test_acc", "test_acc_fast", "test_acc_slow"):
        assert outcome.metrics[key] == child.metrics[f"final_{key}"]
    # so does the logged (pyfunc) model, rebuilt from the best checkpoint
    model_id = tracker.logged_model_id(child.run_id)
    assert model_id is not None
    test = open_dataset("synthetic").split("test")
    scores = tracker.load_model(model_id).predict({m: np.asarray(a) for m, a in test.inputs.items()})
    assert float((scores.argmax(1) == np.asarray(test.labels)).mean()) == pytest.approx(child.metrics["final_test_acc"])
