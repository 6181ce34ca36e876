"""End to end through the CLI with a temporary registry: train, eval, resume, and the MLflow layout."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny import tiny_run

from dmgl_cli.config import load_config
from dmgl_cli.imbalance import MACHINE_MEASURED
from dmgl_cli.run import scoring, training
from dmgl_cli.tracking import Tracker, local_path, mlflow_metric_name

FAST = tiny_run(epochs=3)


def _parent_id(output: str) -> str:
    return re.search(r"parent run ([0-9a-f]{32})", output).group(1)


def _history(tracker: Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, mlflow_metric_name(key)))


@pytest.mark.slow
def test_train_lb_two_seeds_records_everything(run_cli, synthetic, registry):
    result = run_cli("train", "--strategy", "lb", "--seeds", "2", *FAST)
    parent_id = _parent_id(result.output)
    assert "mean over 2 seeds" in result.output
    tracker = Tracker()
    parent = tracker.get_run(parent_id)
    assert parent.status == "FINISHED"
    assert parent.tags["dmgl.role"] == "parent" and parent.tags["dmgl.strategy"] == "lb"
    experiment = tracker.client.get_experiment(parent.experiment_id)
    assert experiment.name == "synthetic"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    recipe = load_config("synthetic")
    assert parent.params["strategy.lb.approx"] == recipe.strategy.lb.approx
    assert parent.params["seeds"] == "0,1"
    children = tracker.children(parent_id)
    assert [c.tags["dmgl.seed"] for c in children] == ["0", "1"]
    finals = []
    for child in children:
        run_id = child.run_id
        assert child.status == "FINISHED"
        assert child.params["train.seed"] == child.tags["dmgl.seed"]
        alpha = _history(tracker, run_id, "alpha")
        assert [step for step, _ in alpha] == [1, 2, 3]  # one value per epoch, step = epoch
        assert all(0.0 <= value <= 1.0 for _, value in alpha)
        assert len(_history(tracker, run_id, "val_acc_slow")) == 3
        assert len(_history(tracker, run_id, "val_modality_gap")) == 3
        # test: at each new best epoch on validation (epoch 1 always is) and at the last
        tested = [step for step, _ in _history(tracker, run_id, "test_modality_gap")]
        assert tested[0] == 1 and tested[-1] == 3
        folder = local_path(child.artifact_uri)
        for name in ("best", "last"):
            state = torch.load(folder / "checkpoints" / f"{name}.pt", weights_only=True)
            assert state["format"] == "dmgl-checkpoint" and "model" in state
        assert (folder / "alpha.png").stat().st_size > 1000
        csv_lines = (folder / "alpha.csv").read_text().splitlines()
        assert csv_lines[0].startswith("epoch,epoch_fraction,alpha") and len(csv_lines) == 4
        final = json.loads((folder / "final_metrics.json").read_text())
        assert 1 <= final["best_epoch"] <= 3
        assert child.metrics["final_test_acc"] == pytest.approx(final["test_acc"])
        finals.append(final["test_acc"])
    mean = sum(finals) / 2
    assert parent.metrics["final_test_acc"] == pytest.approx(mean)  # the seeds' name: one column sorts both
    assert "final_test_acc_std" in parent.metrics
    # the parent's curves: per epoch, the mean over the seeds of what they logged, and its std
    seed_curves = [dict(tracker.metric_history(c.run_id, "val_acc")) for c in tracker.children(parent.run_id)]
    parent_curve = tracker.metric_history(parent.run_id, "val_acc")
    assert [step for step, _ in parent_curve] == sorted(seed_curves[0])
    for step, value in parent_curve:
        assert value == pytest.approx(sum(curve[step] for curve in seed_curves) / len(seed_curves))
    assert len(tracker.metric_history(parent.run_id, "val_acc_std")) == len(parent_curve)
    assert (local_path(parent.artifact_uri) / "alpha.png").is_file()


@pytest.mark.slow
def test_best_epoch_is_chosen_on_validation(run_cli, synthetic):
    result = run_cli("train", "--strategy", "heuristic", "--epochs", "4")
    tracker = Tracker()
    child = tracker.children(_parent_id(result.output))[0]
    val = _history(tracker, child.run_id, "val_acc")
    test = dict(_history(tracker, child.run_id, "test_acc"))
    best_epoch = max(val, key=lambda sv: (sv[1], -sv[0]))[0]  # first epoch with the highest val acc
    assert child.metrics["final_best_epoch"] == best_epoch
    assert child.metrics["final_test_acc"] == test[best_epoch]


@pytest.mark.slow
def test_eval_reproduces_the_logged_test_metrics_exactly(run_cli, synthetic):
    result = run_cli("train", "--strategy", "lb", *FAST)
    parent_id = _parent_id(result.output)
    tracker = Tracker()
    child = tracker.children(parent_id)[0]
    out = run_cli("eval", child.run_id)
    assert "matches the logged metrics exactly" in out.output
    outcome = scoring.evaluate_run(child.run_id, tracker=tracker, checkpoint="best", split="test")[0]
    for key in ("test_acc", "test_map", "test_f1", "test_acc_fast", "test_acc_slow", "test_gap_acc"):
        assert outcome.metrics[key] == child.metrics[f"final_{key}"]
    assert outcome.max_abs_diff == 0
    last = scoring.evaluate_run(parent_id, tracker=tracker, checkpoint="last", split="val")
    assert len(last) == 1 and last[0].max_abs_diff == 0
    recorded = tracker.get_run(child.run_id).metrics
    assert recorded["eval_best_test_acc"] == child.metrics["final_test_acc"]


@pytest.mark.slow
def test_resume_after_a_stop_equals_an_uninterrupted_run(run_cli, synthetic):
    config = load_config("synthetic", ["train.epochs=4", "strategy.name=lb", "strategy.lb.update_every=5"])
    reference = training.train(config, [0], tracker=Tracker(), run_name="reference")

    class Stop(Exception):
        pass

    def stop_after_epoch_2(seed, epoch, total, metrics):
        if epoch == 2:
            raise Stop()

    parents = []
    with pytest.raises(Stop):
        training.train(
            config, [0], tracker=Tracker(), run_name="stopped", progress=stop_after_epoch_2, on_parent=parents.append
        )
    tracker = Tracker()
    child = tracker.children(parents[0])[0]
    assert child.status == "FAILED"
    run_cli("train", "--resume", child.run_id)
    resumed = tracker.get_run(child.run_id)
    assert resumed.status == "FINISHED"
    assert tracker.get_run(parents[0]).status == "FINISHED"
    ref_child = reference.seeds[0].run_id
    for key in ("alpha", "train_loss", "val_acc", "test_acc", "test_acc_slow", "val_modality_gap"):
        # Same values at every epoch, each (key, step) logged once: exact resume in the same run.
        assert _history(tracker, child.run_id, key) == _history(tracker, ref_child, key)
    ref_final = tracker.get_run(ref_child).metrics
    for key, value in ref_final.items():
        if key.startswith("final_") and key[len("final_") :] not in MACHINE_MEASURED:
            assert resumed.metrics[key] == value


@pytest.mark.slow
def test_resume_of_a_parent_finishes_its_seeds(run_cli, synthetic):
    config = load_config("synthetic", ["train.epochs=2", "strategy.name=heuristic"])

    def interrupt(seed, epoch, total, metrics):
        if seed == 1:
            raise KeyboardInterrupt

    parents = []
    with pytest.raises(KeyboardInterrupt):
        training.train(config, [0, 1, 2], tracker=Tracker(), progress=interrupt, on_parent=parents.append)
    tracker = Tracker()
    assert tracker.get_run(parents[0]).status == "KILLED"
    statuses = [c.status for c in tracker.children(parents[0])]
    assert statuses == ["FINISHED", "KILLED"]  # seed 2 never started
    result = run_cli("train", "--resume", parents[0])
    assert "mean over 3 seeds" in result.output
    children = tracker.children(parents[0])
    assert [c.tags["dmgl.seed"] for c in children] == ["0", "1", "2"]
    assert all(c.status == "FINISHED" for c in children)
    assert tracker.get_run(parents[0]).status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        ["--strategy", "constant", "--alpha", "0"],
        ["--strategy", "stepwise", "--p", "0.05"],
        ["--strategy", "lb", "--set", "strategy.lb.approx=cg"],
        ["--strategy", "lb", "--set", "strategy.lb.approx=identity", "--set", "strategy.lb.update_every=epoch"],
        ["--strategy", "heuristic", "--set", "loss.matching=js"],
    ],
)
def test_every_strategy_trains(run_cli, synthetic, strategy):
    result = run_cli("train", *strategy, "--epochs", "2")
    assert "mean over 1 seeds" in result.output


def test_constant_alpha_is_logged_unchanged(run_cli, synthetic):
    result = run_cli("train", "--strategy", "constant", "--alpha", "0.25", "--epochs", "2")
    tracker = Tracker()
    child = tracker.children(_parent_id(result.output))[0]
    assert [v for _, v in _history(tracker, child.run_id, "alpha")] == [0.25, 0.25]


@pytest.mark.slow
def test_seeds_are_reproducible_on_cpu(run_cli, synthetic):
    first = run_cli("train", "--strategy", "lb", "--epochs", "2", "--seeds", "5,6")
    second = run_cli("train", "--strategy", "lb", "--epochs", "2", "--seeds", "5,6")
    tracker = Tracker()
    a = [c.metrics for c in tracker.children(_parent_id(first.output))]
    b = [c.metrics for c in tracker.children(_parent_id(second.output))]
    keys = [k for k in a[0] if k.startswith("final_") and k[len("final_") :] not in MACHINE_MEASURED]
    assert [[m[k] for k in keys] for m in a] == [[m[k] for k in keys] for m in b]
    assert a[0]["final_test_acc"] != a[1]["final_test_acc"] or a[0]["final_val_cls_loss"] != a[1]["final_val_cls_loss"]


@pytest.mark.slow
def test_a_comparison_method_trains_as_published_unless_a_strategy_is_given(run_cli, synthetic):
    tracker = Tracker()
    plain = tracker.get_run(_parent_id(run_cli("train", "--method", "sum", "--epochs", "1").output))
    assert plain.tags["dmgl.strategy"] == "constant" and plain.params["strategy.alpha"] == "0.0"
    combined = tracker.get_run(
        _parent_id(run_cli("train", "--method", "sum", "--strategy", "heuristic", "--epochs", "1").output)
    )
    assert combined.tags["dmgl.strategy"] == "heuristic"
    ours = tracker.get_run(_parent_id(run_cli("train", "--method", "concat", "--epochs", "1").output))
    assert ours.tags["dmgl.strategy"] == "lb"  # the paper's model keeps the recipe's strategy
