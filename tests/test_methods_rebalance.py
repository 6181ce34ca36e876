"""The rebalancing baselines and dmgl-official through the CLI: each trains on synthetic data, logs the common
multimodal and per-modality metrics, and shows its own mechanism in the run's metrics or checkpoint."""

from __future__ import annotations

import math
import re

import pytest
import torch

from dmgl_cli.config import load_config
from dmgl_cli.tracking import Tracker, local_path
from dmgl_cli.train import hold_out

BASE = ["--strategy", "constant", "--alpha", "0", "--set", "train.batch_size=32"]
COMMON = ["val_acc", "test_acc", "test_map", "test_f1", "test_acc_fast", "test_acc_slow", "test_gap_acc",
          "val_acc_fast", "val_acc_slow", "train_loss"]
REBALANCING = ["mses", "g-blend", "ogm-ge", "greedy", "domfn", "mslr", "pmr", "agm", "mla"]


def _train(run_cli, *args: str) -> str:
    """Train one seed; returns the seed run's id after checking the common metrics are there for every epoch."""
    result = run_cli("train", *args)
    run_id = re.search(r"seed 0 \(run ([0-9a-f]{32})\)", result.output).group(1)
    epochs = int(re.search(r"epoch +\d+/(\d+)", result.output).group(1))
    tracker = Tracker()
    for key in COMMON:
        history = _history(run_id, key)
        assert [step for step, _ in history] == list(range(1, epochs + 1)), key
        assert all(math.isfinite(value) for _, value in history), key
    gap = _history(run_id, "test_gap_acc")[-1][1]
    assert gap == pytest.approx(abs(_history(run_id, "test_acc_fast")[-1][1] - _history(run_id, "test_acc_slow")[-1][1]))
    assert tracker.get_run(run_id).info.status == "FINISHED"
    return run_id


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in Tracker().client.get_metric_history(run_id, key))


def _values(run_id: str, key: str) -> list[float]:
    values = [value for _, value in _history(run_id, key)]
    assert values, f"metric {key} was not logged"
    return values


def _last_checkpoint(run_id: str) -> dict:
    folder = local_path(Tracker().get_run(run_id).info.artifact_uri)
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)


def test_unknown_method_lists_the_valid_ones(run_cli, synthetic):
    result = run_cli("train", "--method", "no-such-method", *BASE, expect=1)
    assert "unknown method 'no-such-method'" in result.output
    for name in [*REBALANCING, "dmgl-official", "concat"]:
        assert name in result.output


def test_ogm_ge_slows_the_dominant_modality(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "ogm-ge", "--epochs", "2", *BASE)
    fast, slow = _values(run_id, "ogm_coeff_fast"), _values(run_id, "ogm_coeff_slow")
    # The fast modality dominates the synthetic data: its encoder gradients are scaled down, the slow one's are not.
    assert all(0 < f < 1 for f in fast) and all(f < s for f, s in zip(fast, slow, strict=True))
    assert _values(run_id, "ogm_ratio_fast")[0] > 1 > _values(run_id, "ogm_ratio_slow")[0]


def test_g_blend_recomputes_its_weights(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "g-blend", "--epochs", "2", *BASE,
                    "--set", "method.options.g-blend.super_epoch=1")
    assert _values(run_id, "gblend_updates")[-1] >= 1
    weights = {h: _values(run_id, f"gblend_weight_{h}") for h in ("fast", "slow", "fused")}
    for epoch in range(2):
        assert sum(w[epoch] for w in weights.values()) == pytest.approx(1.0)
    # Re-estimated from the heads' overfitting-to-generalisation ratios: no longer the uniform starting weights.
    assert any(abs(w[-1] - 1 / 3) > 1e-3 for w in weights.values())
    assert _values(run_id, "train_gblend_blend")


def test_mla_alternates_modalities_with_a_shared_head(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "mla", "--epochs", "2", *BASE)
    fast, slow = _values(run_id, "mla_steps_fast"), _values(run_id, "mla_steps_slow")
    assert fast == slow and fast[0] > 0  # every batch trains each modality once, one after the other
    state = _last_checkpoint(run_id)
    assert state["global_step"] == int(fast[0] + slow[0]) * 2  # one optimiser step per modality per batch
    assert "fusion.head.weight" in state["model"] and state["model"]["fusion.head.weight"].shape[1] == 32
    weights = _values(run_id, "mla_fusion_weight_fast")[-1] + _values(run_id, "mla_fusion_weight_slow")[-1]
    assert weights == pytest.approx(1.0)
    projection = state["method"]["own"]["projection"]
    assert projection.shape == (32, 32) and not torch.allclose(projection, torch.eye(32))


def test_mla_refuses_a_matching_strategy(run_cli, synthetic):
    result = run_cli("train", "--method", "mla", "--strategy", "lb", "--epochs", "1", expect=1)
    assert "--strategy constant --alpha 0" in result.output
    assert Tracker().client.get_experiment_by_name("synthetic") is None  # refused before any run was created


def test_pmr_moves_its_prototypes(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "pmr", "--epochs", "2", *BASE)
    for modality in ("fast", "slow"):
        shift = _values(run_id, f"pmr_proto_shift_{modality}")
        assert len(shift) == 1 and shift[0] > 0  # prototypes first built before epoch 1, moved before epoch 2
    assert _values(run_id, "pmr_boost_slow")[0] > _values(run_id, "pmr_boost_fast")[0]  # PCE goes to the slow one
    assert _values(run_id, "train_pmr_proto")[0] > 0
    prototypes = _last_checkpoint(run_id)["method"]["own"]["prototypes"]
    assert prototypes["fast"].shape == (8, 32)


def test_mses_freezes_and_restores_an_encoder(run_cli, synthetic):
    # min_delta larger than any loss: no epoch after the first counts as an improvement, so with patience 0 every
    # modality stops after epoch 2 and trains no more in epoch 3.
    run_id = _train(run_cli, "--method", "mses", "--epochs", "3", *BASE, "--set", "method.options.mses.patience=0",
                    "--set", "method.options.mses.min_delta=100")
    assert _values(run_id, "mses_frozen_slow") == [0.0, 1.0, 1.0]
    assert _values(run_id, "mses_stop_epoch_fast") == [2.0, 2.0]
    state = _last_checkpoint(run_id)
    best = state["method"]["own"]["best_branch"]["slow"]
    for key, value in best.items():
        if key.startswith("encoder."):  # restored to its epoch-1 weights and not trained since
            assert torch.equal(state["model"][f"encoders.slow.{key[len('encoder.'):]}"], value)


def test_mslr_sets_per_modality_learning_rates(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "mslr", "--epochs", "3", *BASE,
                    "--set", "method.options.mslr.lr_scale={fast: 0.5, slow: 2.0}",
                    "--set", "method.options.mslr.window=1")
    fast, slow = _values(run_id, "mslr_lr_fast"), _values(run_id, "mslr_lr_slow")
    assert slow[0] == pytest.approx(4 * fast[0]) and fast[0] == pytest.approx(0.05 * 0.5)
    # Dynamic schedule: before epoch 3 each rate is scaled by (val acc epoch 2) / (val acc epoch 1).
    for modality, lrs in (("fast", fast), ("slow", slow)):
        accuracy = _values(run_id, f"val_acc_{modality}")
        dynamic = _values(run_id, f"mslr_dynamic_{modality}")
        assert dynamic[:2] == [1.0, 1.0] and dynamic[2] == pytest.approx(accuracy[1] / accuracy[0])
        assert lrs[2] == pytest.approx(lrs[0] * dynamic[2])


def test_greedy_rebalances_towards_the_slower_modality(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "greedy", "--epochs", "2", *BASE,
                    "--set", "method.options.greedy.tolerance=0.0")
    # The slow modality's branch changes least (small inputs, small gradients): the re-balancing steps go to it.
    assert sum(_values(run_id, "greedy_rebalance_steps_slow")) > sum(_values(run_id, "greedy_rebalance_steps_fast"))
    assert _values(run_id, "greedy_speed_slow")[0] < _values(run_id, "greedy_speed_fast")[0]
    state = _last_checkpoint(run_id)["method"]["own"]
    assert state["remaining"] >= 0 and set(state["accumulated"]) == {"fast", "slow"}


def test_domfn_rejects_fusion_when_modalities_diverge(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "domfn", "--epochs", "2", *BASE, "--set", "method.options.domfn.margin=0.05")
    rejected = _values(run_id, "domfn_rejected")
    assert all(0.0 <= r <= 1.0 for r in rejected) and max(rejected) > 0
    assert _values(run_id, "domfn_divergence")[0] > 0 and _values(run_id, "train_domfn_unimodal")[0] > 0


def test_agm_modulates_by_shapley_responses(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "agm", "--epochs", "2", *BASE)
    coefficients = _values(run_id, "agm_coeff_fast") + _values(run_id, "agm_coeff_slow")
    assert all(c > 0 for c in coefficients) and any(abs(c - 1.0) > 1e-3 for c in coefficients)
    assert _values(run_id, "agm_score_fast")[-1] > 0


def test_dmgl_official_pins_the_official_settings(run_cli, synthetic):
    result = run_cli("train", "--method", "dmgl-official", "--epochs", "2", "--set", "train.batch_size=32")
    run_id = re.search(r"seed 0 \(run ([0-9a-f]{32})\)", result.output).group(1)
    params = Tracker().get_run(run_id).data.params
    assert params["loss.matching"] == "js" and params["strategy.lb.outer_data"] == "holdout"
    assert params["strategy.lb.params"] == "first" and params["strategy.lb.update_every"] == "epoch"
    assert float(params["strategy.lb.initial_alpha"]) == 0.95 and params["strategy.lb.outer_batch_size"] == "8"
    alphas = _values(run_id, "alpha")
    assert all(0.05 <= a <= 0.95 for a in alphas)
    assert len(_values(run_id, "alpha_hypergradient")) == 2  # one update per epoch
    assert _last_checkpoint(run_id)["strategy"]["updates"] == 2
    result = run_cli("train", "--method", "dmgl-official", "--strategy", "heuristic", "--epochs", "1", expect=1)
    assert "--strategy lb only" in result.output


def test_holdout_and_first_parameter_settings(synthetic):
    config = load_config("synthetic", ["method.name=dmgl-official"])
    assert config.strategy.lb.outer_data == "holdout" and config.strategy.lb.outer_batch_size == 8
    from dmgl_cli.runner import open_dataset
    from dmgl_cli.train import Trainer

    class Sink:
        def log_metrics(self, metrics, step):
            pass

        def save_checkpoint(self, name, state):
            pass

    trainer = Trainer(config, open_dataset("synthetic"), 0, Sink())
    assert len(trainer.holdout) == 8 and trainer._outer_split() is trainer.holdout
    assert not set(trainer.holdout.indices) & set(trainer.splits.train.indices)
    assert len(trainer.holdout) + len(trainer.splits.train) == 405  # 450 train samples minus the 10% validation
    first = trainer._hyper_parameters()
    assert len(first) == 1 and first[0] is next(iter(trainer.model.parameters()))
    kept, held = hold_out(trainer.splits.train, 3, seed=1, transform=None)
    assert len(kept) == len(trainer.splits.train) - 3 and len(held) == 3
