"""Evaluation costs what it must: validation every ``train.eval_every`` epochs, test only at new best epochs and at
the last one, and the chosen epoch and the reported test figure are those of scoring everything every epoch."""

from __future__ import annotations

import pytest
import yaml

from dmgl_cli.config import config_from_dict, load_config
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.errors import DmglError
from dmgl_cli.train import Trainer


class RecordingSink:
    def __init__(self):
        self.metrics: dict[int, dict[str, float]] = {}
        self.best_saved: list[int] = []

    def log_metrics(self, metrics, step):
        self.metrics[step] = dict(metrics)

    def save_checkpoint(self, name, state):
        if name == "best":
            self.best_saved.append(state["epoch"])


def _fit(overrides):
    config = load_config("synthetic", ["train.epochs=6", "train.batch_size=64", "strategy.name=heuristic", *overrides])
    sink = RecordingSink()
    trainer = Trainer(config, open_dataset("synthetic"), 0, sink)
    scored: list[str] = []
    score = trainer._score

    def counting(split, **options):
        scored.append(split)
        return score(split, **options)

    trainer._score = counting
    return trainer.fit(), sink, scored


def test_test_only_at_new_best_epochs_and_the_last_gives_the_figure_of_per_epoch_curves(synthetic):
    curves, curve_sink, curve_scores = _fit(["train.test_curves=true"])
    lean, lean_sink, lean_scores = _fit([])
    assert curve_scores.count("test") == 6 and curve_scores.count("val") == 6
    assert lean.best_epoch == curves.best_epoch
    assert lean.final == curves.final  # val and test at the chosen epoch, bit for bit
    assert curves.final["test_acc"] == curve_sink.metrics[curves.best_epoch]["test_acc"]
    # test scored at each epoch that became the best on validation, and at the last epoch
    tested = sorted(step for step, m in lean_sink.metrics.items() if "test_acc" in m)
    assert tested == sorted({*lean_sink.best_saved, 6})
    assert lean_scores.count("test") == len(tested) < 6
    # the whole history except the test scores is the same
    for step in range(1, 7):
        drop = {
            k for k in curve_sink.metrics[step] if k.startswith("test_") or k == "epoch_seconds" or k.endswith("per_s")
        }
        kept = {k: v for k, v in curve_sink.metrics[step].items() if k not in drop}
        assert {k: v for k, v in lean_sink.metrics[step].items() if k not in drop} == kept


def test_eval_every_scores_validation_every_k_epochs_and_at_the_last(synthetic):
    result, sink, scored = _fit(["train.eval_every=4"])
    validated = [step for step, m in sink.metrics.items() if "val_acc" in m]
    assert validated == [4, 6] and scored.count("val") == 2
    assert result.best_epoch in (4, 6)
    assert sink.metrics[6]["test_acc"] is not None


def test_eval_every_is_refused_where_validation_is_read_every_epoch():
    with pytest.raises(DmglError, match="train.eval_every=1"):
        load_config("synthetic", ["train.eval_every=3", "method.name=mslr", "method.options.mslr.schedule=dynamic"])
    with pytest.raises(DmglError, match="train.eval_every must be >= 1"):
        load_config("synthetic", ["train.eval_every=0"])


def test_a_config_recorded_with_the_former_name_still_reads():
    recorded = yaml.safe_load(load_config("synthetic").to_yaml())
    del recorded["train"]["test_curves"]
    recorded["train"]["eval_test_every_epoch"] = True  # as v0.1 recorded it
    assert config_from_dict(recorded).train.test_curves is True
    with pytest.raises(DmglError, match="now 'train.test_curves'"):
        load_config("synthetic", ["train.eval_test_every_epoch=true"])
