"""The rebalancing baselines through the CLI: each trains on synthetic data, logs the common
multimodal and per-modality metrics, and shows its own mechanism in the run's metrics or checkpoint."""

from __future__ import annotations

import math
import re

import pytest
import torch

from dmgl_cli.tracking import Tracker, local_path, mlflow_metric_name

BASE = ["--strategy", "constant", "--alpha", "0", "--set", "train.batch_size=32"]
COMMON = [
    "val_acc",
    "test_acc",
    "test_map",
    "test_f1",
    "test_acc_fast",
    "test_acc_slow",
    "test_gap_acc",
    "val_acc_fast",
    "val_acc_slow",
    "train_loss",
]
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
    assert gap == pytest.approx(
        abs(_history(run_id, "test_acc_fast")[-1][1] - _history(run_id, "test_acc_slow")[-1][1])
    )
    assert tracker.get_run(run_id).status == "FINISHED"
    return run_id


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in Tracker().client.get_metric_history(run_id, mlflow_metric_name(key)))


def _values(run_id: str, key: str) -> list[float]:
    values = [value for _, value in _history(run_id, key)]
    assert values, f"metric {key} was not logged"
    return values


def _last_checkpoint(run_id: str) -> dict:
    folder = local_path(Tracker().get_run(run_id).artifact_uri)
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)


def test_unknown_method_lists_the_valid_ones(run_cli, synthetic):
    result = run_cli("train", "--method", "no-such-method", *BASE, expect=1)
    assert "unknown method 'no-such-method'" in result.output
    for name in [*REBALANCING, "dmgl-official", "concat"]:
        assert name in result.output


@pytest.mark.slow
def test_ogm_ge_slows_the_dominant_modality(run_cli, synthetic):
    # The synthetic encoders are MLPs, without the 2-D convolution kernels the authors' rule modulates.
    run_id = _train(
        run_cli, "--method", "ogm-ge", "--epochs", "2", *BASE, "--set", "method.options.ogm-ge.params=weights"
    )
    fast, slow = _values(run_id, "ogm_coeff_fast"), _values(run_id, "ogm_coeff_slow")
    # The fast modality dominates the synthetic data: its encoder gradients are scaled down, the slow one's are not.
    assert all(0 < f < 1 for f in fast) and all(f < s for f, s in zip(fast, slow, strict=True))
    assert _values(run_id, "ogm_ratio_fast")[0] > 1 > _values(run_id, "ogm_ratio_slow")[0]


@pytest.mark.slow
def test_g_blend_estimates_its_weights_from_temporary_copies(run_cli, synthetic):
    run_id = _train(
        run_cli,
        "--method",
        "g-blend",
        "--epochs",
        "2",
        *BASE,
        "--set",
        "method.options.g-blend.super_epoch=1",
        "--set",
        "method.options.g-blend.copy_epochs=2",
        "--set",
        "method.options.g-blend.copy_batches=4",
    )
    assert _values(run_id, "gblend_updates") == [1.0, 2.0]  # an estimate before each epoch, the first included
    heads = ("fast", "slow", "fused")
    weights = {h: _values(run_id, f"gblend_weight_{h}") for h in heads}
    gains = {h: _values(run_id, f"gblend_generalisation_{h}") for h in heads}
    overfits = {h: _values(run_id, f"gblend_overfitting_{h}") for h in heads}
    for epoch in range(2):
        raw = {h: abs(gains[h][epoch]) / overfits[h][epoch] ** 2 for h in heads}
        for h in heads:
            assert weights[h][epoch] == pytest.approx(raw[h] / sum(raw.values()), rel=1e-4)
    # Training starts from an estimate, not from uniform weights.
    assert any(abs(w[0] - 1 / 3) > 1e-3 for w in weights.values())
    estimate = _last_checkpoint(run_id)["method"]["own"]["last_estimate"]
    assert estimate["epoch"] == 2 and set(estimate["losses"]) == set(heads)
    assert _values(run_id, "train_gblend_blend")


@pytest.mark.slow
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


@pytest.mark.slow
def test_pmr_moves_its_prototypes(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "pmr", "--epochs", "2", *BASE)
    for modality in ("fast", "slow"):
        shift = _values(run_id, f"pmr_proto_shift_{modality}")
        assert len(shift) == 1 and shift[0] > 0  # prototypes first built before epoch 1, moved before epoch 2
    assert _values(run_id, "pmr_boost_slow")[0] > _values(run_id, "pmr_boost_fast")[0]  # PCE goes to the slow one
    assert _values(run_id, "train_pmr_proto")[0] > 0
    assert _history(run_id, "train_pmr_entropy_reg") == []  # the entropy regulariser is off by default
    own = _last_checkpoint(run_id)["method"]["own"]
    assert own["prototypes"]["fast"].shape == (8, 32) and own["prototype_updates"] == 2


@pytest.mark.slow
def test_mses_freezes_and_restores_an_encoder(run_cli, synthetic):
    # min_delta larger than any loss: no epoch after the first counts as an improvement, so with patience 0 every
    # modality stops after epoch 2; the whole model is put back to epoch 1 and both branches are zeroed in epoch 3.
    run_id = _train(
        run_cli,
        "--method",
        "mses",
        "--epochs",
        "3",
        *BASE,
        "--set",
        "method.options.mses.patience=0",
        "--set",
        "method.options.mses.min_delta=100",
    )
    assert _values(run_id, "mses_frozen_slow") == [0.0, 1.0, 1.0]
    assert _values(run_id, "mses_stop_epoch_fast") == [2.0, 2.0]
    own = _last_checkpoint(run_id)["method"]["own"]
    assert own["best_epoch"] == {"fast": 1, "slow": 1} and own["frozen"] == {"fast": 2, "slow": 2}
    assert own["snapshots"] == {} and own["pending_restore"] == []  # restored, and nothing left to return to


@pytest.mark.slow
def test_mslr_sets_per_modality_learning_rates(run_cli, synthetic):
    run_id = _train(
        run_cli,
        "--method",
        "mslr",
        "--epochs",
        "3",
        *BASE,
        "--set",
        "method.options.mslr.lr_scale={fast: 0.5, slow: 2.0}",
        "--set",
        "method.options.mslr.window=1",
    )
    fast, slow = _values(run_id, "mslr_coeff_fast"), _values(run_id, "mslr_coeff_slow")
    assert fast[0] == pytest.approx(0.5) and slow[0] == pytest.approx(2.0)
    assert _values(run_id, "mslr_lr_slow")[0] == pytest.approx(0.05 * 2.0)
    # Dynamic schedule: in epoch 3 each factor is lr_scale * (val acc epoch 2) / (val acc epoch 1).
    for modality, scale, coefficients in (("fast", 0.5, fast), ("slow", 2.0, slow)):
        accuracy = _values(run_id, f"val_acc_{modality}")
        dynamic = _values(run_id, f"mslr_dynamic_{modality}")
        assert dynamic[:2] == [1.0, 1.0] and dynamic[2] == pytest.approx(accuracy[1] / accuracy[0])
        assert coefficients[2] == pytest.approx(scale * dynamic[2])


@pytest.mark.slow
def test_greedy_rebalances_after_its_warm_up_epoch(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "greedy", "--epochs", "2", *BASE, "--set", "method.options.greedy.epsilon=0.0")
    fast, slow = _values(run_id, "greedy_curation_steps_fast"), _values(run_id, "greedy_curation_steps_slow")
    # Epoch 1 is the warm-up (starting_epoch 2); with epsilon 0 every normal step of epoch 2 opens a window.
    assert fast[0] == slow[0] == 0.0 and fast[1] + slow[1] > 0
    assert all(
        math.isfinite(v) for key in ("greedy_d_bdr", "greedy_bdr_fast", "greedy_bdr_slow") for v in _values(run_id, key)
    )
    state = _last_checkpoint(run_id)
    greedy = state["method"]["greedy"]
    assert greedy["unlocked"] and all(v > 0 for v in greedy["bypass_speed"] + greedy["main_speed"])
    # The running averages are checkpointed with the model: one update per forward pass, training and evaluation.
    assert int(state["model"]["mmtms.0.averaged_batches"]) > state["global_step"]


@pytest.mark.slow
def test_domfn_rejects_fusion_when_modalities_diverge(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "domfn", "--epochs", "2", *BASE, "--set", "method.options.domfn.margin=0.05")
    rejected = _values(run_id, "domfn_rejected")
    assert all(0.0 <= r <= 1.0 for r in rejected) and max(rejected) > 0
    assert _values(run_id, "domfn_divergence")[0] > 0 and _values(run_id, "train_domfn_unimodal")[0] > 0


@pytest.mark.slow
def test_agm_modulates_by_shapley_responses(run_cli, synthetic):
    run_id = _train(run_cli, "--method", "agm", "--epochs", "2", *BASE)
    coefficients = _values(run_id, "agm_coeff_fast") + _values(run_id, "agm_coeff_slow")
    assert all(c > 0 for c in coefficients) and any(abs(c - 1.0) > 1e-3 for c in coefficients)
    assert _values(run_id, "agm_score_fast")[-1] > 0
    assert all(0.0 <= c <= 1.0 for c in _values(run_id, "agm_clipped"))  # the authors' conditional clip
