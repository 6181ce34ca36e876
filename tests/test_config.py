"""Recipes, overrides, resolution and validation."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import typing

import pytest

from dmgl_cli import catalogue
from dmgl_cli import config as config_module
from dmgl_cli.config import (
    Config,
    LearningBasedConfig,
    config_from_yaml,
    derive,
    flatten,
    load_config,
    resolve,
    set_dotted,
    setting_applies,
    validate,
    with_seed,
)
from dmgl_cli.errors import DmglError
from dmgl_cli.strategies import ALPHA_GRADIENTS, StrategySpec, spec_from_flags


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
        ("strategy.name=magic", "unknown strategy 'magic'; valid: constant, stepwise, heuristic, linear, lb"),
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
    tree = {"train": {"epochs": 3}}
    with pytest.raises(DmglError, match="'epochs' is a value"):
        set_dotted(tree, "train.epochs.x", 1)
    set_dotted(tree, "strategy.lb.terms", 5)
    assert tree == {"train": {"epochs": 3}, "strategy": {"lb": {"terms": 5}}}
    with pytest.raises(DmglError, match="must look like key=value"):
        load_config("synthetic", ["train.epochs"])


def test_resolved_config_is_frozen_and_seed_copies_share_the_rest():
    config = load_config("synthetic")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 3  # type: ignore[misc]
    seeded = with_seed(config, 7)
    assert seeded.train.seed == 7 and config.train.seed == 0
    assert dataclasses.replace(seeded.train, seed=0) == config.train and seeded.model is config.model


def test_resolve_precedence_recipe_then_published_then_set_then_flags():
    # --method without --strategy: the comparison method trains as published (constant alpha 0) ...
    assert resolve("synthetic", method="greedy").strategy.name == "constant"
    # ... unless --set or --strategy says otherwise; the typed flags win over --set.
    assert resolve("synthetic", ["strategy.name=heuristic"], method="greedy").strategy.name == "heuristic"
    config = resolve(
        "synthetic",
        ["strategy.name=heuristic", "train.epochs=9"],
        strategy=StrategySpec("constant", 0.25),
        settings={"train.epochs": 2},
    )
    assert (config.strategy.name, config.strategy.alpha, config.train.epochs) == ("constant", 0.25, 2)
    # a spec without a value keeps the recipe's alpha
    assert resolve("synthetic", ["strategy.alpha=0.75"], strategy=StrategySpec("constant")).strategy.alpha == 0.75
    unimodal = resolve("synthetic", method="unimodal", modality="slow")
    assert unimodal.method.options["unimodal"]["modality"] == "slow"
    with pytest.raises(DmglError, match="--modality picks the one modality of --method unimodal"):
        resolve("synthetic", modality="slow")


def test_strategy_flags_become_one_spec():
    assert spec_from_flags(None) is None
    assert spec_from_flags("LB") == StrategySpec("lb")
    assert spec_from_flags("constant:0.5") == StrategySpec("constant", 0.5)
    assert spec_from_flags("constant", alpha=0.5) == StrategySpec("constant", 0.5)
    assert spec_from_flags(None, alpha=0.0) == StrategySpec("constant", 0.0)
    assert spec_from_flags("h(0.95)") == StrategySpec("stepwise", 0.95)
    with pytest.raises(DmglError, match="--alpha applies to --strategy constant, not lb"):
        spec_from_flags("lb", alpha=0.5)
    with pytest.raises(DmglError, match="--p applies to --strategy stepwise, not heuristic"):
        spec_from_flags("heuristic", p=0.5)
    with pytest.raises(DmglError, match="two values"):
        spec_from_flags("constant:0.5", alpha=0.25)


def test_validate_only_checks_and_a_method_pins_its_settings_once(caplog):
    with caplog.at_level(logging.WARNING, logger="dmgl"):
        config = resolve("synthetic", method="dmgl-official", strategy=StrategySpec("lb"))
    assert config.strategy.lb.approx == "official" and config.loss.matching == "mixture_kl"
    assert len([r for r in caplog.records if "method dmgl-official sets" in r.getMessage()]) == 1
    before = config.to_dict()
    validate(config)
    assert config.to_dict() == before
    # a recorded config that no longer holds the method's settings is refused, not silently rewritten
    edited = dataclasses.replace(
        config, strategy=dataclasses.replace(config.strategy, lb=dataclasses.replace(config.strategy.lb, approx="cg"))
    )
    with pytest.raises(DmglError, match="cannot run with strategy.lb.approx='cg'"):
        validate(edited)


def test_derive_applies_dotted_settings_and_validates():
    base = load_config("synthetic")
    trial = derive(base, {"strategy.name": "stepwise", "strategy.p": 0.95, "optim.lr": 0.5})
    assert (trial.strategy.name, trial.strategy.p, trial.optim.lr) == ("stepwise", 0.95, 0.5)
    assert base.strategy.name == "lb" and base.optim.lr != 0.5
    with pytest.raises(DmglError, match=r"p must be in \[0, 1\]"):
        derive(base, {"strategy.name": "stepwise", "strategy.p": 2.0})


def test_choice_fields_are_literal_types_matching_the_code():
    hints = typing.get_type_hints(LearningBasedConfig)
    approx = typing.get_args(hints["approx"])
    assert set(approx) == set(ALPHA_GRADIENTS)
    with pytest.raises(DmglError, match="unknown strategy.lb.outer_data 'test'; valid: holdout, val, train"):
        load_config("synthetic", ["strategy.lb.outer_data=test"])
    with pytest.raises(DmglError, match='strategy.lb.update_every\' must be int or "epoch" or "epoch_start"'):
        load_config("synthetic", ["strategy.lb.update_every=never"])


def test_method_and_strategy_names_come_from_the_catalogue():
    with pytest.raises(DmglError, match="unknown method 'concot'; valid: concat, unimodal, .*dmgl-official-eq3"):
        load_config("synthetic", ["method.name=concot"])
    with pytest.raises(DmglError, match="unknown strategy 'cosine'; valid: constant, stepwise, heuristic, linear, lb"):
        load_config("synthetic", ["strategy.name=cosine"])


def test_the_implementations_registries_hold_the_catalogues_names():
    # The catalogue names what config accepts; each implementation registry must build exactly those.
    from dmgl_cli.losses import MATCHING_LOSSES
    from dmgl_cli.methods import METHODS, Method
    from dmgl_cli.models import ENCODERS, FUSIONS

    assert tuple(ENCODERS) == catalogue.ENCODER_NAMES
    assert tuple(FUSIONS) == catalogue.FUSION_NAMES
    assert tuple(MATCHING_LOSSES) == catalogue.MATCHING_LOSS_NAMES
    assert list(METHODS) == list(catalogue.METHODS)
    for name, method in METHODS.items():
        assert method.entry is catalogue.METHODS[name] and method.name == name
        # approx=ggn linearises the plain cross-entropy: an entry says whether its method keeps it
        plain = method.classification_loss is Method.classification_loss
        assert catalogue.METHODS[name].plain_classification_loss == plain, name


def test_validation_imports_no_implementation():
    # --print-config and --dry-run resolve a config; torch and the implementations must stay unloaded
    code = (
        "import sys; from dmgl_cli.config import load_config; "
        "load_config('synthetic', ['method.name=g-blend', 'strategy.name=lb', 'strategy.lb.approx=ggn']); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('dmgl_cli.methods', 'dmgl_cli.models'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


# Runs one dmgl command in a fresh interpreter and prints whether it loaded torch.
_TORCH_PROBE = (
    "import sys; from dmgl_cli.cli import cli; "
    "cli.main(sys.argv[1:], prog_name='dmgl', standalone_mode=False); "
    "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', file=sys.stderr)"
)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--print-config"],
        ["train", "--method", "g-blend", "--print-config"],
        ["train", "--dry-run", "--seeds", "2"],
        ["train", "--method", "pmr", "--strategy", "lb", "--set", "strategy.lb.approx=ggn", "--dry-run"],
    ],
)
def test_print_config_and_dry_run_do_not_load_torch(synthetic, args):
    result = subprocess.run(
        [sys.executable, "-c", _TORCH_PROBE, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "torch not loaded"


def test_setting_applies_follows_each_strategys_own_settings():
    assert setting_applies("strategy.alpha", "constant", "concat")
    assert not setting_applies("strategy.alpha", "lb", "concat")
    assert setting_applies("strategy.p", "stepwise", "concat") and not setting_applies("strategy.p", "linear", "x")
    assert setting_applies("strategy.linear_rate", "linear", "concat")
    assert not setting_applies("strategy.linear_start", "heuristic", "concat")
    assert setting_applies("strategy.lb.alpha_lr", "lb", "concat")
    assert not setting_applies("strategy.lb.alpha_lr", "constant", "concat")
    assert setting_applies("strategy.name", "heuristic", "concat")
    assert setting_applies("method.options.pmr.alpha", "lb", "pmr")
    assert not setting_applies("method.options.pmr.alpha", "lb", "agm")
    assert setting_applies("optim.lr", "lb", "agm")


@pytest.mark.slow
def test_train_resolves_the_config_once(monkeypatch, synthetic, run_cli):
    calls = []
    real = config_module.validate
    monkeypatch.setattr(config_module, "validate", lambda config: (calls.append(1), real(config))[1])
    run_cli("train", "--epochs", "1", "--seeds", "2", "--silent", "--strategy", "constant:0.5")
    assert len(calls) == 1


def test_defaults_are_valid():
    config = Config()
    assert config.strategy.name == "lb" and config.loss.matching == "infonce"


def test_scientific_notation_without_a_dot_is_a_number():
    # YAML 1.1 reads "1e-4" as a string; a float setting takes it as the number it is
    assert load_config("synthetic", ["optim.weight_decay=1e-4"]).optim.weight_decay == 1e-4
    with pytest.raises(DmglError, match="optim.weight_decay' must be a number"):
        load_config("synthetic", ["optim.weight_decay=lots"])


def test_ggn_is_refused_where_it_cannot_linearise_before_any_run():
    base = ["strategy.name=lb", "strategy.lb.approx=ggn"]
    assert load_config("synthetic", base).strategy.lb.approx == "ggn"
    with pytest.raises(DmglError, match="needs loss.matching=infonce"):
        load_config("synthetic", [*base, "loss.matching=js"])
    with pytest.raises(DmglError, match="method etmc replaces it"):
        load_config("synthetic", [*base, "method.name=etmc"])
