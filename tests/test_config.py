"""Recipes, overrides and validation."""

from __future__ import annotations

import pytest

from dmgl_cli.config import Config, apply_overrides, config_from_yaml, flatten, load_config
from dmgl_cli.errors import DmglError


def test_synthetic_recipe_loads_with_overrides():
    config = load_config("synthetic", ["train.epochs=7", "optim.lr=0.5", "strategy.lb.update_every=epoch"])
    assert config.train.epochs == 7
    assert config.optim.lr == 0.5
    assert config.strategy.lb.update_every == "epoch"
    assert config.dataset == "synthetic" and config.recipe == "synthetic"


def test_round_trip_through_yaml_is_identical():
    config = load_config("synthetic", ["strategy.name=stepwise", "strategy.p=0.95"])
    again = config_from_yaml(config.to_yaml())
    assert again == config
    assert flatten(again.to_dict())["strategy.p"] == 0.95


def test_unknown_setting_suggests_the_close_name():
    with pytest.raises(DmglError, match=r"unknown setting 'train.epoch' — did you mean 'train.epochs'"):
        load_config("synthetic", ["train.epoch=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.epochs=abc", "must be an integer"),
        ("strategy.name=magic", "unknown strategy 'magic'; valid: constant, stepwise, heuristic, lb"),
        ("strategy.alpha=1.5", r"alpha must be in \[0, 1\]"),
        ("strategy.p=-0.1", r"p must be in \[0, 1\]"),
        ("loss.matching=l2", "unknown loss.matching 'l2'"),
        ("loss.tau=0", "loss.tau must be > 0"),
        ("optim.name=rmsprop", "unknown optim.name 'rmsprop'"),
        ("method.name=nope", "unknown method 'nope'; valid: .*concat"),
        ("strategy.lb.alpha_lr=0", "strategy.lb.alpha_lr must be > 0"),
        ("data.val_fraction=1.0", r"data.val_fraction must be in \(0, 1\)"),
    ],
)
def test_bad_values_name_the_setting(override, message):
    settings = [override]
    if override.startswith("strategy.alpha"):
        settings.append("strategy.name=constant")
    if override.startswith("strategy.p"):
        settings.append("strategy.name=stepwise")
    with pytest.raises(DmglError, match=message):
        load_config("synthetic", settings)


def test_unknown_recipe_lists_the_built_in_ones():
    with pytest.raises(DmglError, match="unknown recipe 'nope'; built-in recipes: .*synthetic"):
        load_config("nope")


def test_recipe_path_and_bad_yaml(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("dataset: synthetic\ntrain: {epochs: 2}\n")
    assert load_config(str(good)).train.epochs == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(DmglError, match="is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(DmglError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_override_into_a_value_is_refused():
    with pytest.raises(DmglError, match="'epochs' is a value"):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])
    with pytest.raises(DmglError, match="must look like key=value"):
        apply_overrides({}, ["train.epochs"])


def test_defaults_are_valid():
    config = Config()
    assert config.strategy.name == "lb" and config.loss.matching == "infonce"
