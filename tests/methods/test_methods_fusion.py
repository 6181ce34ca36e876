"""The fusion baselines of Table 1 (unimodal, sum, weight, affine, channel, ml-lstm, etmc) through the CLI.

Each method trains two short epochs on the synthetic data, logs the common multimodal and per-modality metrics,
and its distinctive mechanism is checked on the recorded run: the model is rebuilt from the run's config.yaml and
best checkpoint, exactly as ``dmgl eval`` does, and probed on real test samples.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from dmgl_cli.config import config_from_yaml, load_config
from dmgl_cli.data.loader import make_splits, sample_batch
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.device import seed_everything
from dmgl_cli.errors import DmglError
from dmgl_cli.methods import METHODS, build_method
from dmgl_cli.methods.etmc import dempster_shafer
from dmgl_cli.run import training
from dmgl_cli.tracking import Tracker
from dmgl_cli.train import compute_losses

FUSION_METHODS = ["unimodal", "sum", "weight", "affine", "channel", "ml-lstm", "etmc"]
SHORT = ["--epochs", "2", "--set", "train.batch_size=64"]
BASELINE = ["--strategy", "constant", "--alpha", "0"]
MODALITIES = ["fast", "slow"]


def _train(run_cli, method: str, *extra: str):
    result = run_cli("train", "--method", method, *BASELINE, *SHORT, *extra)
    parent_id = re.search(r"parent run ([0-9a-f]{32})", result.output).group(1)
    tracker = Tracker()
    (child,) = tracker.children(parent_id)
    assert child.status == "FINISHED"
    return tracker, child


def _history(tracker: Tracker, run, key: str) -> list[float]:
    return [value for _, value in tracker.metric_history(run.run_id, key)]


def _assert_common_metrics(tracker: Tracker, run, modalities: list[str], source: str, epochs: int = 2) -> None:
    """The metrics every row of Table 1 is built from, per epoch and at the selected epoch."""
    keys = [
        "train_loss",
        "train_cls_loss",
        "val_acc",
        "val_map",
        "val_f1",
        "test_acc",
        "test_map",
        "test_f1",
        "test_gap_acc",
        "val_cls_loss",
    ]
    keys += [
        f"{split}_{metric}_{m}" for split in ("val", "test") for metric in ("acc", "map", "f1") for m in modalities
    ]
    if len(modalities) >= 2:
        keys.append("test_modality_gap")
    for key in keys:
        values = _history(tracker, run, key)
        assert len(values) == epochs, key
        assert all(v == v for v in values), key  # no NaN
    for key in ("final_test_acc", "final_test_gap_acc", *(f"final_test_acc_{m}" for m in modalities)):
        assert key in run.metrics, key
    assert 0.0 <= run.metrics["final_test_acc"] <= 1.0
    assert run.tags["dmgl.per_modality_scores"] == source


def _rebuild(tracker: Tracker, run):
    """(method, model in eval mode with the best weights, a test batch) of a recorded seed run."""
    config = config_from_yaml(tracker.read_text(run.run_id, "config.yaml"))
    dataset = open_dataset(config.dataset)
    method = build_method(config)
    model = method.build_model(dataset.modalities, dataset.num_classes)
    model.load_state_dict(tracker.load_checkpoint(run.run_id, "best")["model"])
    model.eval()
    splits = make_splits(dataset, config.data.val_fraction, config.data.split_seed)
    batch = sample_batch(splits.test, 48, seed=0)
    return method, model, batch


# ------------------------------------------------------------------------------------------------- registry


def test_unknown_method_lists_every_valid_name(run_cli, synthetic):
    result = run_cli("train", "--method", "no-such-method", *SHORT, expect=1)
    assert "unknown method 'no-such-method'" in result.output
    for name in ["concat", *FUSION_METHODS]:
        assert name in result.output
        assert name in METHODS


# ------------------------------------------------------------------------------------------------- unimodal


def test_unimodal_trains_one_encoder_and_scores_it(run_cli, synthetic):
    tracker, run = _train(run_cli, "unimodal", "--modality", "slow")
    _assert_common_metrics(tracker, run, ["slow"], "own")
    assert run.params["method.options.unimodal.modality"] == "slow"
    # One encoder, one head: nothing of the other modality exists in the model.
    state = tracker.load_checkpoint(run.run_id, "best")["model"]
    assert {key.split(".")[1] for key in state if key.startswith("encoders.")} == {"slow"}
    assert not any("fast" in key for key in state)
    assert not _history(tracker, run, "test_acc_fast") and not _history(tracker, run, "test_modality_gap")
    assert _history(tracker, run, "test_acc_slow") == _history(tracker, run, "test_acc")  # its own prediction
    assert _history(tracker, run, "test_gap_acc") == [0.0, 0.0]
    assert _history(tracker, run, "train_mm_loss") == []  # alpha is 0 throughout: L_MM is not computed


@pytest.mark.slow
def test_unimodal_refusals_are_clear(run_cli, synthetic):
    out = run_cli("train", "--method", "unimodal", *BASELINE, *SHORT, expect=1).output
    assert "--modality NAME" in out
    out = run_cli("train", "--method", "unimodal", "--modality", "nope", *BASELINE, *SHORT, expect=1).output
    assert "no such modality" in out and "fast, slow" in out
    out = run_cli("train", "--method", "unimodal", "--modality", "fast", "--strategy", "lb", *SHORT, expect=1).output
    assert "cannot be combined with --strategy lb" in out and "constant" in out
    out = run_cli(
        "train",
        "--method",
        "unimodal",
        "--modality",
        "fast",
        "--strategy",
        "constant",
        "--alpha",
        "0.5",
        *SHORT,
        expect=1,
    ).output
    assert "alpha = 0" in out
    out = run_cli("train", "--method", "sum", "--modality", "fast", *BASELINE, *SHORT, expect=1).output
    assert "--modality" in out and "drop --modality" in out


# ------------------------------------------------------------------------------------------------------ sum


@pytest.mark.slow
def test_sum_logits_are_the_sum_of_per_modality_logits(run_cli, synthetic):
    tracker, run = _train(run_cli, "sum")
    _assert_common_metrics(tracker, run, MODALITIES, "own")
    _, model, batch = _rebuild(tracker, run)
    with torch.no_grad():
        out = model(batch["inputs"])
    assert set(out.unimodal_logits) == set(MODALITIES)
    torch.testing.assert_close(out.logits, out.unimodal_logits["fast"] + out.unimodal_logits["slow"])


# --------------------------------------------------------------------------------------------------- weight


@pytest.mark.slow
def test_weight_learns_per_sample_modality_weights_and_logs_them(run_cli, synthetic):
    tracker, run = _train(run_cli, "weight")
    _assert_common_metrics(tracker, run, MODALITIES, "own")
    fast, slow = _history(tracker, run, "weight_fast"), _history(tracker, run, "weight_slow")
    assert len(fast) == 2 and fast[0] != fast[1]  # the learned weights move with training
    for a, b in zip(fast, slow, strict=True):
        assert a + b == pytest.approx(1.0, abs=1e-5) and 0 < a < 1
    assert len(_history(tracker, run, "train_unimodal_loss")) == 2  # CMML's per-modality supervision
    _, model, batch = _rebuild(tracker, run)
    with torch.no_grad():
        out = model(batch["inputs"])
    weights = out.extras["weights"]
    assert weights.shape == (48, 2) and weights.std(dim=0).min() > 0  # per sample, not one global weight
    mixture = sum(weights[:, j : j + 1] * out.unimodal_logits[m].softmax(-1) for j, m in enumerate(MODALITIES))
    torch.testing.assert_close(out.logits.softmax(-1), mixture)


@pytest.mark.slow
def test_weight_combines_with_the_heuristic_strategy(run_cli, synthetic):
    result = run_cli("train", "--method", "weight", "--strategy", "heuristic", *SHORT)
    tracker = Tracker()
    run = tracker.children(re.search(r"parent run ([0-9a-f]{32})", result.output).group(1))[0]
    alphas = _history(tracker, run, "alpha")
    assert alphas[0] > 0 and all(v > 0 for v in _history(tracker, run, "train_mm_loss"))


# --------------------------------------------------------------------------------------------------- affine


@pytest.mark.slow
@pytest.mark.parametrize("condition", ["fast", "slow"])
def test_affine_scale_and_shift_come_from_the_conditioning_modality(run_cli, synthetic, condition):
    tracker, run = _train(run_cli, "affine", "--set", f"method.options.affine.condition={condition}")
    _assert_common_metrics(tracker, run, MODALITIES, "probe")
    assert len(_history(tracker, run, "film_scale_std")) == 2 and len(_history(tracker, run, "probe_loss")) == 2
    _, model, batch = _rebuild(tracker, run)
    other = "slow" if condition == "fast" else "fast"
    assert (model.fusion.condition, model.fusion.modulated) == (condition, other)
    with torch.no_grad():
        embeddings = model.encode(batch["inputs"])
        gamma, beta = model.fusion.scale_shift(embeddings)
        moved_other = {**embeddings, other: embeddings[other].flip(0)}
        moved_condition = {**embeddings, condition: embeddings[condition].flip(0)}
        same = model.fusion.scale_shift(moved_other)
        changed = model.fusion.scale_shift(moved_condition)
        logits_other = model.fusion(moved_other)[0]
    torch.testing.assert_close(same[0], gamma)
    torch.testing.assert_close(same[1], beta)
    assert not torch.allclose(changed[0], gamma) and not torch.allclose(changed[1], beta)
    # The modulated modality still drives the prediction, through gamma * z + beta.
    assert not torch.allclose(logits_other, model.fusion(embeddings)[0])


def test_probes_train_on_detached_embeddings_and_never_touch_the_model(registry):
    config = load_config("synthetic", ["method.name=affine", "strategy.name=constant", "model.embed_dim=8"])
    method = build_method(config)
    specs = {m: {"kind": "vector", "dtype": "float32", "shape": [6]} for m in MODALITIES}
    seed_everything(0)
    model = method.build_model(specs, 4)
    probe_ids = {id(p) for p in model.fusion.probes.parameters()}
    main_ids = {id(p) for group in method.param_groups(model) for p in group["params"]}
    assert probe_ids and not probe_ids & main_ids  # the main optimiser never sees the probes
    inputs = {m: torch.randn(16, 6) for m in MODALITIES}
    labels = torch.randint(0, 4, (16,))
    output = method.forward(model, inputs, training=True)
    cls_loss, _ = compute_losses(method, config, output, labels)
    cls_loss.backward()
    assert all(p.grad is None for p in model.fusion.probes.parameters())  # detached: the loss cannot reach them
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    method.after_backward(model, output, labels, {})
    for name, p in model.named_parameters():
        if name.startswith("fusion.probes."):
            assert not torch.equal(p, before[name]) and p.grad is None  # stepped, then cleared for clipping
        else:
            assert torch.equal(p, before[name])
            assert (p.grad is None) == (name not in grads) and (p.grad is None or torch.equal(p.grad, grads[name]))
    fresh = build_method(config)
    fresh.load_state_dict(method.state_dict())
    fresh.after_backward(model, output, labels, {})  # the restored Adam state continues, step count and all
    assert fresh.state_dict()["probe_optimizer"]["state"][0]["step"] == 2


def test_probe_methods_refuse_prediction_matching(run_cli, synthetic):
    out = run_cli(
        "train", "--method", "ml-lstm", "--strategy", "heuristic", "--set", "loss.matching=js", *SHORT, expect=1
    ).output
    assert "loss.matching=js" in out and "infonce" in out


# -------------------------------------------------------------------------------------------------- channel


@pytest.mark.slow
def test_channel_exchanges_squeeze_excitation_gates_between_encoders(run_cli, synthetic):
    tracker, run = _train(run_cli, "channel")
    _assert_common_metrics(tracker, run, MODALITIES, "own")
    # The default encoders have two hidden layers: one MMTM after each, gating both modalities.
    for point in (0, 1):
        for m in MODALITIES:
            gates = _history(tracker, run, f"mmtm_gate_{point}_{m}")
            assert len(gates) == 2 and all(0 < g < 2 for g in gates)
    assert all(s > 0.01 for s in _history(tracker, run, "mmtm_gate_std"))
    _, model, batch = _rebuild(tracker, run)
    with torch.no_grad():
        out = model(batch["inputs"])
        gates = torch.cat([g.flatten() for point in out.extras["gates"] for g in point])
        assert not torch.allclose(gates, torch.ones_like(gates), atol=1e-2)
        # Cross-modal exchange: the fast stream's embedding depends on the slow modality's input.
        shuffled = {**batch["inputs"], "slow": batch["inputs"]["slow"].flip(0)}
        assert not torch.allclose(model(shuffled).embeddings["fast"], out.embeddings["fast"])
    torch.testing.assert_close(out.logits, (out.unimodal_logits["fast"] + out.unimodal_logits["slow"]) / 2)


def test_channel_refuses_text_modalities(registry):
    config = load_config("synthetic", ["method.name=channel", "strategy.name=constant"])
    specs = {
        "text": {"kind": "text", "dtype": "int64", "shape": [16]},
        "image": {"kind": "image", "dtype": "uint8", "shape": [8, 8, 3]},
    }
    with pytest.raises(DmglError, match="modality 'text' is text.*no Channel result"):
        build_method(config).build_model(specs, 2)


# -------------------------------------------------------------------------------------------------- ml-lstm


@pytest.mark.slow
def test_ml_lstm_runs_over_the_modality_sequence(run_cli, synthetic):
    tracker, run = _train(run_cli, "ml-lstm")
    _assert_common_metrics(tracker, run, MODALITIES, "probe")
    _, model, batch = _rebuild(tracker, run)
    assert model.fusion.lstm.num_layers == 2
    seen = []
    hook = model.fusion.lstm.register_forward_hook(lambda module, args, output: seen.append(args[0].shape))
    with torch.no_grad():
        embeddings = model.encode(batch["inputs"])
        logits = model.fusion(embeddings)[0]
        swapped = model.fusion({"fast": embeddings["slow"], "slow": embeddings["fast"]})[0]
    hook.remove()
    assert seen[0] == (48, 2, 32)  # [batch, one step per modality, embed_dim]
    assert not torch.allclose(logits, swapped)  # a sequence model: the order of the modalities matters


# ----------------------------------------------------------------------------------------------------- etmc


@pytest.mark.slow
def test_etmc_logs_uncertainty_and_anneals_the_kl_term(run_cli, synthetic):
    tracker, run = _train(run_cli, "etmc", "--epochs", "3", "--set", "method.options.etmc.annealing_epochs=2")
    _assert_common_metrics(tracker, run, MODALITIES, "own", epochs=3)
    for key in ("etmc_strength", "etmc_uncertainty", "etmc_uncertainty_fast", "etmc_uncertainty_pseudo"):
        assert len(_history(tracker, run, key)) == 3, key
    assert _history(tracker, run, "etmc_kl_coef") == [0.0, 0.5, 1.0]  # min(1, t / annealing), t = 0, 1, 2
    assert all(0 < u < 1 for u in _history(tracker, run, "etmc_uncertainty"))
    method, model, batch = _rebuild(tracker, run)
    with torch.no_grad():
        out = method.forward(model, batch["inputs"], training=False)
    alphas = out.extras["alphas"]
    assert set(alphas) == {"fast", "slow", "pseudo", "fused"} and all((a >= 1).all() for a in alphas.values())
    # Scores are the Dirichlet's expected probabilities alpha / S, fused by Dempster-Shafer.
    torch.testing.assert_close(out.logits.softmax(-1), alphas["fused"] / alphas["fused"].sum(-1, keepdim=True))
    combined = dempster_shafer(dempster_shafer(alphas["fast"], alphas["slow"]), alphas["pseudo"])
    torch.testing.assert_close(alphas["fused"], combined)
    # The evidential loss replaces the cross-entropy as L_CLS.
    assert not torch.isclose(
        method.classification_loss(out, batch["labels"]), F.cross_entropy(out.logits, batch["labels"])
    )


@pytest.mark.slow
def test_etmc_combines_with_the_lb_strategy(run_cli, synthetic):
    """The LB outer step differentiates the method's L_CLS (ETMC's evidential loss) and moves alpha."""
    result = run_cli("train", "--method", "etmc", "--strategy", "lb", "--set", "strategy.lb.update_every=epoch", *SHORT)
    tracker = Tracker()
    run = tracker.children(re.search(r"parent run ([0-9a-f]{32})", result.output).group(1))[0]
    hypergradients = _history(tracker, run, "alpha_hypergradient")
    assert len(hypergradients) == 2 and all(g == g and g != 0 for g in hypergradients)
    assert _history(tracker, run, "alpha")[-1] != pytest.approx(0.5)  # moved from strategy.lb.initial_alpha


def test_dempster_shafer_with_a_vacuous_opinion_changes_nothing():
    opinion = torch.tensor([[5.0, 1.0, 2.0], [1.0, 1.0, 9.0]])
    vacuous = torch.ones_like(opinion)  # no evidence: uncertainty 1
    torch.testing.assert_close(dempster_shafer(opinion, vacuous), opinion)
    torch.testing.assert_close(dempster_shafer(vacuous, opinion), opinion)
    agreeing = dempster_shafer(opinion, opinion)
    assert (agreeing.sum(-1) > opinion.sum(-1)).all()  # two agreeing opinions: more evidence, less uncertainty


# --------------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_is_exact_with_the_probes_optimiser_state(run_cli, synthetic):
    """The probes' Adam state is method state: without it in the checkpoint the resumed probes would drift."""
    config = load_config("synthetic", ["train.epochs=2", "method.name=affine", "strategy.name=constant"])
    reference = training.train(config, [0], tracker=Tracker(), run_name="reference")

    class Stop(Exception):
        pass

    def stop_after_epoch_1(seed, epoch, total, metrics):
        if epoch == 1:
            raise Stop()

    parents: list[str] = []
    with pytest.raises(Stop):
        training.train(
            config, [0], tracker=Tracker(), run_name="stopped", progress=stop_after_epoch_1, on_parent=parents.append
        )
    tracker = Tracker()
    child = tracker.children(parents[0])[0]
    run_cli("train", "--resume", child.run_id)
    reference_run = tracker.get_run(reference.seeds[0].run_id)
    resumed_run = tracker.get_run(child.run_id)
    for key in ("train_loss", "val_acc", "test_acc_fast", "test_acc_slow", "probe_loss"):
        assert _history(tracker, resumed_run, key) == _history(tracker, reference_run, key), key
