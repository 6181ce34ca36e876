"""ARCHITECTURE.md's "How to add" steps, followed to the letter for a toy method and a toy schedule strategy: the
method is one file with its catalogue entry, the schedule one class in the strategy registry (both registered into
the explicit dicts with monkeypatch), and a tiny synthetic run must train with both, numerically."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import pytest

from dmgl_cli import catalogue
from dmgl_cli.catalogue import MethodEntry, MethodOptions
from dmgl_cli.catalogue.options import Checks
from dmgl_cli.config import Config, recorded_params, resolve
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.errors import DmglError
from dmgl_cli.strategies import STRATEGIES, AlphaStrategy, StrategyConfig, StrategySpec
from dmgl_cli.strategies.schedules import check_epoch
from dmgl_cli.train import Trainer

TOY_MODULE = "dmgl_toy_logit_penalty"
EPOCHS = 3

# Step 1 of "a comparison method": one file with a Method subclass declared with its entry's name.
TOY_METHOD_FILE = '''
"""A logit penalty: weight * mean(logits^2) added to the objective; it keeps what the hook returned."""

from dmgl_cli.methods.base import Method


class LogitPenaltyMethod(Method, method="toy-logit-penalty"):
    def __init__(self, config, options):
        super().__init__(config, options)
        self.returned = []  # (epoch, alpha the loop passed, penalty, batch size) per step

    def extra_losses(self, output, labels, step):
        penalty = self.options.weight * output.logits.float().pow(2).mean()
        self.returned.append((step["epoch"], step["alpha"], float(penalty.detach()), int(labels.shape[0])))
        return {"logit_penalty": penalty}
'''


# Step 2: the method's options dataclass (its defaults and checks) and its catalogue entry.
@dataclass(frozen=True)
class LogitPenaltyOptions(MethodOptions):
    weight: float = 0.05

    def check(self, config: Config, checks: Checks) -> None:
        checks.non_negative("weight")


# "A schedule strategy": one class, with its line in the registry.
class HalvingStrategy(AlphaStrategy):
    """alpha = 0.8 / 2^epoch."""

    name = "toy-halving"

    @classmethod
    def from_settings(cls, settings: StrategyConfig, seed: int) -> AlphaStrategy:
        return cls(0.8)

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        check_epoch(epoch, total_epochs)
        self._alpha = 0.8 * 0.5**epoch


@pytest.fixture
def toys(tmp_path, monkeypatch):
    (tmp_path / f"{TOY_MODULE}.py").write_text(textwrap.dedent(TOY_METHOD_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, TOY_MODULE, raising=False)  # imported afresh, and forgotten after the test
    entry = MethodEntry(
        "toy-logit-penalty",
        "Logit penalty",
        f"{TOY_MODULE}:LogitPenaltyMethod",
        LogitPenaltyOptions,
        published_strategy=StrategySpec("toy-halving"),
    )
    monkeypatch.setitem(catalogue.METHODS, entry.name, entry)
    monkeypatch.setitem(STRATEGIES, HalvingStrategy.name, HalvingStrategy)
    yield
    sys.modules.pop(TOY_MODULE, None)


class KeepingSink:
    def __init__(self):
        self.metrics: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step):
        self.metrics.setdefault(step, {}).update(metrics)

    def save_checkpoint(self, name, state):
        pass


def test_a_toy_method_and_schedule_resolve_and_train(toys, synthetic):
    # its published strategy is the toy schedule; --set of its option is checked and recorded
    config = resolve(
        "synthetic",
        ["method.options.toy-logit-penalty.weight=0.2"],
        method="toy-logit-penalty",
        settings={"train.epochs": EPOCHS, "train.batch_size": 64, "optim.scheduler": "none"},
    )
    assert (config.method.name, config.strategy.name) == ("toy-logit-penalty", "toy-halving")
    assert recorded_params(config)["method.options.toy-logit-penalty.weight"] == 0.2
    with pytest.raises(DmglError, match="method.options.toy-logit-penalty.weight must be a number >= 0"):
        resolve("synthetic", ["method.options.toy-logit-penalty.weight=-1"], method="toy-logit-penalty")
    with pytest.raises(DmglError, match="'toy-logit-penalty' takes: weight"):
        resolve("synthetic", ["method.options.toy-logit-penalty.wieght=1"], method="toy-logit-penalty")

    sink = KeepingSink()
    trainer = Trainer(config, open_dataset("synthetic"), 0, sink)
    assert type(trainer.strategy) is HalvingStrategy and trainer.method.options == LogitPenaltyOptions(0.2)
    trainer.fit()

    returned = trainer.method.returned  # type: ignore[attr-defined]  # the toy method's own record
    for epoch in range(1, EPOCHS + 1):
        alpha = 0.8 * 0.5 ** (epoch - 1)
        steps = [r for r in returned if r[0] == epoch]
        metrics = sink.metrics[epoch]
        # the schedule's alpha is the one the loop trained with and logged
        assert steps and all(step_alpha == pytest.approx(alpha) for _, step_alpha, _, _ in steps)
        assert metrics["alpha"] == pytest.approx(alpha)
        # the hook's term is what the epoch logs, and it is in the objective: loss = (1-a) L_CLS + a L_MM + penalty
        seen = sum(size for *_, size in steps)
        penalty = sum(value * size for _, _, value, size in steps) / seen
        assert penalty > 0 and metrics["train_logit_penalty"] == pytest.approx(penalty, rel=1e-5)
        objective = (1 - alpha) * metrics["train_cls_loss"] + alpha * metrics["train_mm_loss"] + penalty
        assert metrics["train_loss"] == pytest.approx(objective, rel=1e-5)
