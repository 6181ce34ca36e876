import dataclasses
import io
import math

import pytest
import torch

from dmgl_cli.config_types import flatten
from dmgl_cli.errors import DmglError
from dmgl_cli.strategies import (
    STRATEGIES,
    ConstantStrategy,
    HeuristicStrategy,
    LearningBasedStrategy,
    LinearStrategy,
    StepwiseStrategy,
    StrategyConfig,
    build_strategy,
    parse_strategy,
    setting_of,
)
from dmgl_cli.strategies.settings import LearningBasedConfig

LB_DEFAULTS = {
    "initial_alpha": 0.5,
    "alpha_lr": 0.1,
    "update_every": 1,
    "approx": "neumann",
    "terms": 3,
    "scale": 0.01,
    "damping": 0.0,
    "estimator": "step",
    "alpha_optimizer": "sgd",
}


def _lb(**overrides):
    return LearningBasedStrategy(LearningBasedConfig(**{**LB_DEFAULTS, **overrides}))


def test_heuristic_values():
    strategy = HeuristicStrategy()
    assert strategy.alpha == pytest.approx(1 - math.exp(-1))  # t = 1 before the first epoch too
    expected = {0: 1 - math.exp(-1), 1: 1 - math.exp(-1 / 2), 9: 1 - math.exp(-1 / 10)}
    for epoch, alpha in expected.items():
        strategy.start_epoch(epoch, 10)
        assert strategy.alpha == pytest.approx(alpha, rel=1e-12)
    assert strategy.alpha == pytest.approx(0.0951625819640404, rel=1e-12)
    assert not strategy.learns_alpha  # a schedule learns nothing: the trainer builds no outer step


@pytest.mark.parametrize(("total_epochs", "first_half"), [(4, [0, 1]), (5, [0, 1, 2])])
def test_stepwise_halves(total_epochs, first_half):
    strategy = StepwiseStrategy(0.2)
    for epoch in range(total_epochs):
        strategy.start_epoch(epoch, total_epochs)
        assert strategy.alpha == pytest.approx(0.2 if epoch in first_half else 0.8), epoch


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_stepwise_rejects_p_outside_unit_interval(p):
    with pytest.raises(DmglError, match="p must be"):
        StepwiseStrategy(p)


def test_constant_bounds():
    assert ConstantStrategy(0).alpha == 0.0
    assert ConstantStrategy(1).alpha == 1.0
    strategy = ConstantStrategy(0.3)
    strategy.start_epoch(7, 10)
    assert strategy.alpha == 0.3
    with pytest.raises(DmglError, match=r"alpha must be in \[0, 1\], got 1.2"):
        ConstantStrategy(1.2)
    with pytest.raises(DmglError, match=r"alpha must be in \[0, 1\], got -0.5"):
        ConstantStrategy(-0.5)
    assert not strategy.always_zero and ConstantStrategy(0).always_zero


def test_learning_based_descends_and_clips_at_both_ends():
    strategy = _lb(initial_alpha=0.5, alpha_lr=0.1)
    strategy.apply_hypergradient(2.0)
    assert strategy.alpha == pytest.approx(0.3)  # alpha - lr * grad: a positive dL/dalpha lowers alpha
    strategy.apply_hypergradient(-1.0)
    assert strategy.alpha == pytest.approx(0.4)
    strategy.apply_hypergradient(1e9)
    assert strategy.alpha == 0.0
    strategy.apply_hypergradient(-1e9)
    assert strategy.alpha == 1.0
    assert strategy.updates == 4 and strategy.last_hypergradient == -1e9

    bounded = _lb(min_alpha=0.05, max_alpha=0.95)
    bounded.apply_hypergradient(1e9)
    assert bounded.alpha == 0.05
    bounded.apply_hypergradient(-1e9)
    assert bounded.alpha == 0.95


def test_learning_based_keeps_alpha_on_non_finite_hypergradient():
    strategy = _lb()
    strategy.apply_hypergradient(float("nan"))
    assert strategy.alpha == 0.5 and strategy.updates == 0 and math.isnan(strategy.last_hypergradient)
    assert strategy.skipped == 1


def test_update_every_semantics():
    every_three = _lb(update_every=3)
    fired = [step for step in range(1, 10) if every_three.needs_hypergradient(step, False)]
    assert fired == [3, 6, 9]
    assert every_three.needs_hypergradient(6, True) and not every_three.needs_hypergradient(7, True)
    every_step = _lb(update_every=1)
    assert all(every_step.needs_hypergradient(step, False) for step in range(1, 5))
    per_epoch = _lb(update_every="epoch")
    assert not per_epoch.needs_hypergradient(3, False)
    assert per_epoch.needs_hypergradient(4, True)
    # schedules never move alpha between epochs; the learner keeps its learnt value across epochs
    per_epoch.apply_hypergradient(1.0)
    per_epoch.start_epoch(1, 5)
    assert per_epoch.alpha == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"alpha_lr": 0.0}, "strategy.lb.alpha_lr"),
        ({"initial_alpha": 1.2}, "strategy.lb.initial_alpha"),
        ({"initial_alpha": 0.01, "min_alpha": 0.05}, "strategy.lb.initial_alpha"),
        ({"update_every": 0}, "strategy.lb.update_every"),
        ({"update_every": "step"}, "strategy.lb.update_every"),
        ({"update_every": 2.5}, "strategy.lb.update_every"),
        ({"approx": "lbfgs"}, "strategy.lb.approx"),
        ({"approx": "cg", "terms": 0}, "strategy.lb.terms"),
        ({"approx": "neumann", "terms": 2.0}, "strategy.lb.terms"),
        ({"scale": 0.0}, "strategy.lb.scale"),
        ({"alpha_optimizer": "rmsprop"}, "strategy.lb.alpha_optimizer"),
        ({"alpha_lr_halving": 0}, "strategy.lb.alpha_lr_halving"),
        ({"curvature_refresh": 0}, "strategy.lb.curvature_refresh"),
        ({"damping": -1e-3}, "strategy.lb.damping"),
        ({"min_alpha": -0.1}, "strategy.lb.min_alpha"),
        ({"max_alpha": 1.1}, "strategy.lb.max_alpha"),
        ({"min_alpha": 0.6, "max_alpha": 0.4, "initial_alpha": 0.5}, "strategy.lb.min_alpha"),
    ],
)
def test_learning_based_validation_names_the_setting(overrides, setting):
    with pytest.raises(DmglError, match=setting.replace(".", r"\.")):
        _lb(**overrides)


def test_identity_ignores_terms_and_auto_scale_is_none():
    strategy = _lb(approx="identity", terms=0, scale="auto")
    assert strategy.settings.terms == 0 and strategy.scale is None


def test_adam_step_is_independent_of_the_hypergradient_magnitude():
    # the first bias-corrected Adam step is exactly lr * sign(g), whatever |g| is
    for magnitude in (1e-6, 1.0, 1e6):
        strategy = _lb(alpha_optimizer="adam", alpha_lr=0.05)
        strategy.apply_hypergradient(magnitude)
        assert strategy.alpha == pytest.approx(0.45, abs=1e-7)
    # by hand: two steps of Adam (betas 0.9, 0.999) on g = 2 then g = -1
    strategy = _lb(alpha_optimizer="adam", alpha_lr=0.05)
    strategy.apply_hypergradient(2.0)
    strategy.apply_hypergradient(-1.0)
    m = 0.9 * (0.1 * 2.0) + 0.1 * -1.0
    v = 0.999 * (0.001 * 4.0) + 0.001 * 1.0
    second_step = 0.05 * (m / (1 - 0.9**2)) / math.sqrt(v / (1 - 0.999**2))
    assert strategy.alpha == pytest.approx(0.5 - 0.05 - second_step, rel=1e-9)
    restored = _lb(alpha_optimizer="adam", alpha_lr=0.05)
    restored.load_state_dict(_round_trip(strategy.state_dict()))
    strategy.apply_hypergradient(0.3)
    restored.apply_hypergradient(0.3)
    assert restored.alpha == strategy.alpha  # the moments are checkpointed: resume continues the same walk


def test_alpha_lr_halving_follows_the_epochs():
    strategy = _lb(alpha_lr=1e-4, alpha_lr_halving=20)
    for epoch, expected in ((0, 1e-4), (19, 1e-4), (20, 5e-5), (39, 5e-5), (40, 2.5e-5)):
        strategy.start_epoch(epoch, 100)
        assert strategy.current_lr == pytest.approx(expected, rel=1e-12)
    strategy.apply_hypergradient(100.0)
    assert strategy.alpha == pytest.approx(0.5 - 2.5e-5 * 100.0)


def test_epoch_start_goes_with_the_official_rule_only():
    official = _lb(approx="official", update_every="epoch_start")
    assert official.updates_at_epoch_start and not official.needs_hypergradient(5, True)
    for overrides in ({"approx": "official", "update_every": "epoch"}, {"approx": "cg", "update_every": "epoch_start"}):
        with pytest.raises(DmglError, match="epoch_start"):
            _lb(**overrides)


def test_largest_eigenvalue_is_cached_for_curvature_refresh_updates():
    strategy = _lb(approx="neumann", scale="auto", curvature_refresh=2)
    assert strategy.cached_largest_eigenvalue() is None
    strategy.remember_largest_eigenvalue(4.0)
    assert strategy.cached_largest_eigenvalue() == 4.0
    strategy.apply_hypergradient(0.1)
    assert strategy.cached_largest_eigenvalue() == 4.0
    strategy.apply_hypergradient(0.1)
    assert strategy.cached_largest_eigenvalue() is None  # two updates old: estimate again
    restored = _lb(approx="neumann", scale="auto", curvature_refresh=2)
    restored.load_state_dict(_round_trip(strategy.state_dict()))
    assert restored.largest_eigenvalue == 4.0 and restored.eigenvalue_update == 0


def test_approx_error_lists_valid_names():
    with pytest.raises(DmglError) as error:
        _lb(approx="exact")
    assert all(name in str(error.value) for name in ("identity", "neumann", "cg"))


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_through_weights_only_checkpoint():
    strategy = _lb(update_every="epoch")
    fresh = _lb(update_every="epoch")
    fresh.load_state_dict(_round_trip(fresh.state_dict()))  # never updated: last_hypergradient is None
    assert fresh.last_hypergradient is None and fresh.updates == 0
    strategy.apply_hypergradient(0.7)
    strategy.apply_hypergradient(-0.2)
    restored = _lb(update_every="epoch")
    restored.load_state_dict(_round_trip(strategy.state_dict()))
    assert restored.alpha == pytest.approx(0.5 - 0.07 + 0.02)
    assert restored.updates == 2
    assert restored.last_hypergradient == -0.2
    assert restored.state_dict() == strategy.state_dict()

    schedule = StepwiseStrategy(0.3)
    schedule.start_epoch(3, 4)
    copy = StepwiseStrategy(0.3)
    copy.load_state_dict(_round_trip(schedule.state_dict()))
    assert copy.alpha == pytest.approx(0.7)


def test_loading_another_strategys_state_is_a_user_error():
    with pytest.raises(DmglError, match="'heuristic' but this run uses 'lb'"):
        _lb().load_state_dict(HeuristicStrategy().state_dict())


def test_registry_and_build_strategy():
    assert set(STRATEGIES) == {"constant", "stepwise", "heuristic", "linear", "lb"}
    assert isinstance(build_strategy("constant", alpha=0.25), ConstantStrategy)
    assert build_strategy("stepwise", p=0.1).alpha == pytest.approx(0.1)
    assert isinstance(build_strategy("heuristic"), HeuristicStrategy)
    lb = build_strategy("lb", **LB_DEFAULTS)
    assert isinstance(lb, LearningBasedStrategy) and lb.name == "lb"
    with pytest.raises(DmglError) as error:
        build_strategy("cosine")
    assert all(name in str(error.value) for name in STRATEGIES)
    with pytest.raises(DmglError, match="its settings are: alpha"):
        build_strategy("constant", alpha=0.1, beta=2)


def test_linear_falls_by_its_rate_per_epoch_and_stops_at_zero():
    strategy = LinearStrategy(0.5, 0.05)
    alphas = []
    for epoch in range(12):
        strategy.start_epoch(epoch, 12)
        alphas.append(strategy.alpha)
    assert alphas[:3] == pytest.approx([0.5, 0.45, 0.4]) and alphas[10:] == [0.0, 0.0]
    with pytest.raises(DmglError, match="strategy.linear_rate must be >= 0"):
        LinearStrategy(0.5, -0.1)


def test_fixed_sign_control_is_the_linear_decay_and_random_sign_is_seeded():
    # Adam's step on a constant +1 is alpha_lr per update: the fixed-sign control walks as linear:alpha_lr does
    fixed, linear = _lb(direction="fixed", alpha_optimizer="adam", alpha_lr=0.05), LinearStrategy(0.5, 0.05)
    for epoch in range(1, 6):
        fixed.apply_hypergradient(-3.0 * epoch)  # whatever the hypergradient says
        linear.start_epoch(epoch, 20)
        assert fixed.alpha == pytest.approx(linear.alpha, abs=1e-9)
    walks = []
    for seed in (0, 0, 1):
        random_sign = LearningBasedStrategy(LearningBasedConfig(**{**LB_DEFAULTS, "direction": "random"}), seed)
        steps = []
        for _ in range(12):
            before = random_sign.alpha
            random_sign.apply_hypergradient(1.0)
            steps.append(round((before - random_sign.alpha) / 0.1))
        walks.append(steps)
    assert walks[0] == walks[1] != walks[2]  # seeded: the same seed walks the same way
    assert set(walks[0]) == {-1, 1}  # sgd at alpha_lr 0.1: each step is +-0.1, whatever the hypergradient


def test_epoch_estimators_update_once_per_epoch_and_are_first_order():
    with pytest.raises(DmglError, match="update_every=epoch"):
        _lb(estimator="epoch", update_every=5, approx="identity")
    with pytest.raises(DmglError, match="estimator=step to use cg"):
        _lb(estimator="epoch", update_every="epoch", approx="cg")
    with pytest.raises(DmglError, match="strategy.lb.estimator must be one of epoch, forward, average, step"):
        _lb(estimator="exact")


def test_each_strategy_declares_what_specs_tables_and_recorded_params_read():
    assert {name: cls.group for name, cls in STRATEGIES.items()} == {
        "constant": "Constant",
        "stepwise": "Stepwise",
        "heuristic": "Dynamic",
        "linear": "Control",
        "lb": "Dynamic",
    }
    assert {name: setting_of(name) for name in STRATEGIES} == {
        "constant": "strategy.alpha",
        "stepwise": "strategy.p",
        "heuristic": None,
        "linear": "strategy.linear_rate",
        "lb": None,
    }
    assert parse_strategy("linear:0.1").settings() == {"strategy.name": "linear", "strategy.linear_rate": 0.1}
    # a strategy's own settings are settings of the config's strategy section
    section = flatten({"strategy": dataclasses.asdict(StrategyConfig())})
    for cls in STRATEGIES.values():
        for key in cls.setting_keys:
            assert any(k == key or (key.endswith(".") and k.startswith(key)) for k in section), (cls.name, key)
        assert cls.spec_setting is None or cls.spec_setting in cls.setting_keys
