"""MLflow's own features as dmgl uses them: metric names grouped by section (while dmgl keeps its own keys), the
dataset as each run's input, the best checkpoint as a logged model that reloads and predicts as the trainer did,
`dmgl register`, the parent's markdown description, the parameters that apply, and short, distinct run names.

One LB run (2 seeds, 2 epochs) on the synthetic dataset is trained once for the module, with the network cut off
and the trainer's own predictions at each best epoch captured for comparison.
"""

from __future__ import annotations

import re
import socket

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.entities import Metric

from dmgl_cli.cli import cli
from dmgl_cli.cli.register import register as register_command
from dmgl_cli.config import recorded_params, resolve
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.device import autocast, to_device
from dmgl_cli.errors import DmglError
from dmgl_cli.run import scoring, summary, training
from dmgl_cli.run.outcomes import SeedOutcome
from dmgl_cli.run_names import default_run_name
from dmgl_cli.strategies import StrategySpec, parse_strategy
from dmgl_cli.sweep.worker import _run_name
from dmgl_cli.tracking import (
    DATASET_DIGEST_LENGTH,
    Tracker,
    dmgl_metric_name,
    local_path,
    mlflow_metric_name,
)
from dmgl_cli.train import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tracker, TrainOutcome, {seed: (test rows, the trainer's scores on them at its best epoch)})."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DMGL_HOME", str(tmp_path_factory.mktemp("mlflow-features") / "registry"))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = CliRunner().invoke(cli, ["prepare", "synthetic", "-o", "samples=600", "--silent"])
        assert result.exit_code == 0, result.output

        # No network: anything that tries to connect (say, a package index to infer requirements) fails at once
        # and is recorded, rather than hanging.
        attempts: list[object] = []

        def refuse(*args, **kwargs):
            attempts.append(args)
            raise OSError("network disabled in this test")

        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)

        # The trainer's own scores on the first test batch, captured whenever it saves a new best checkpoint.
        predictions: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        best_state = Trainer._best_state

        def capture(self):
            batch = next(iter(self.eval_loaders["test"]))
            inputs, _ = to_device(batch, self.device)
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad(), autocast(self.device, self.config.train.amp):
                scores = self.method.predict(self.method.forward(self.model, inputs, training=False)).float().cpu()
            self.model.train(was_training)
            predictions[self.seed] = (batch["indices"].numpy(), scores.numpy())
            return best_state(self)

        patch.setattr(Trainer, "_best_state", capture)
        # dmgl's requirements are the running versions: MLflow's scan of every installed distribution is skipped
        from mlflow.utils import environment, requirements_utils

        scans: list[object] = []
        patch.setattr(requirements_utils, "_init_packages_to_modules_map", lambda: scans.append(1))
        mismatch_check = environment.warn_dependency_requirement_mismatches
        tracker = Tracker()
        config = resolve("synthetic", ["train.epochs=2", "train.batch_size=64"], strategy=parse_strategy("lb"))
        outcome = training.train(config, [0, 1], tracker=tracker)
        assert attempts == []
        assert scans == [] and environment.warn_dependency_requirement_mismatches is mismatch_check
        yield tracker, outcome, predictions


# ----------------------------------------------------------------------------------------------- metric names


def test_metric_names_map_to_sections_and_back():
    pairs = {
        "val_acc": "val/acc",
        "test_acc_fast": "test/acc_fast",
        "train_loss": "train/loss",
        "final_test_acc": "val_selected/test_acc",  # after every curve's section in the UI
        "final_test_acc_std": "val_selected/test_acc_std",
        "alpha_std": "alpha/value_std",  # a parent's spread sits beside its mean, placed keys too
        "epoch_seconds_std": "train/epoch_seconds_std",
        "best_epoch_std": "val/best_epoch_std",
        "alpha": "alpha/value",
        "alpha_hypergradient": "alpha/hypergradient",
        "alpha_cg_residual": "alpha/cg_residual",
        "lr": "train/lr",
        "epoch_seconds": "train/epoch_seconds",
        "best_epoch": "val/best_epoch",
        "eval_best_test_acc": "eval/best_test_acc",
        "agm_score_audio": "agm/score_audio",
    }
    for key, name in pairs.items():
        assert mlflow_metric_name(key) == name
        assert dmgl_metric_name(name) == key
    # keys that would read back as another stay flat; flat names (runs recorded before the grouping) are their own
    for key in ("train_lr", "alpha_value", "val_best_epoch", "gap", "_x", "x_"):
        assert dmgl_metric_name(mlflow_metric_name(key)) == key
    assert mlflow_metric_name("train_lr") == "train_lr"
    assert dmgl_metric_name("final_test_acc") == "final_test_acc"
    assert dmgl_metric_name("final/test_acc") == "final_test_acc"  # as runs recorded before val_selected/ read


@pytest.mark.slow
def test_mlflow_holds_grouped_names_while_dmgl_reads_its_own(trained):
    tracker, outcome, _ = trained
    seed = outcome.seeds[0]
    logged = set(tracker.client.get_run(seed.run_id).data.metrics)
    assert {
        "val/acc",
        "test/acc",
        "train/loss",
        "alpha/value",
        "alpha/hypergradient",
        "val_selected/test_acc",
    } <= logged
    assert all("/" in name for name in logged)
    assert {name.rsplit("/", 1)[0] for name in logged} == {"alpha", "test", "train", "val", "val_selected"}
    record = tracker.get_run(seed.run_id)
    assert set(record.metrics) == {dmgl_metric_name(name) for name in logged}
    assert record.metrics["final_test_acc"] == seed.final["test_acc"]
    assert [step for step, _ in tracker.metric_history(seed.run_id, "alpha")] == [1, 2]
    assert ("val_acc", 2) in tracker.logged_steps(seed.run_id)
    parent = tracker.client.get_run(outcome.parent_run_id).data.metrics
    # the parent: its seeds' curves (mean and std per epoch) and final scores, under the seeds' own names
    assert {"val/acc", "val/acc_std", "val_selected/test_acc", "val_selected/test_acc_std"} <= set(parent)
    assert {name.rsplit("/", 1)[0] for name in parent} <= {"alpha", "test", "train", "val", "val_selected"}
    assert tracker.get_run(outcome.parent_run_id).metrics["final_test_acc"] == outcome.summary["test_acc"]


def test_runs_recorded_with_flat_names_still_read(registry):
    tracker = Tracker()
    run_id = tracker.start_run(tracker.experiment_id("old"), "old-run", {"dmgl.role": "seed"})
    tracker.client.log_batch(
        run_id,
        metrics=[Metric("alpha", 0.5, 0, 1), Metric("alpha", 0.4, 0, 2), Metric("final_test_acc", 0.75, 0, 2)],
    )
    record = tracker.get_run(run_id)
    assert record.metrics == {"alpha": 0.4, "final_test_acc": 0.75}
    assert tracker.metric_history(run_id, "alpha") == [(1, 0.5), (2, 0.4)]
    assert tracker.logged_steps(run_id) == {("alpha", 1), ("alpha", 2), ("final_test_acc", 2)}
    # resumed after the change: the new epochs go under the grouped name, and both read as one history
    tracker.log_metrics(run_id, {"alpha": 0.3}, step=3)
    assert tracker.client.get_metric_history(run_id, "alpha/value")[0].value == 0.3
    assert tracker.metric_history(run_id, "alpha") == [(1, 0.5), (2, 0.4), (3, 0.3)]
    assert tracker.get_run(run_id).metrics["alpha"] == 0.3
    with pytest.raises(DmglError, match="has no logged model"):
        scoring.register(run_id, "old", tracker=tracker)


# ------------------------------------------------------------------------------------------- dataset and model


@pytest.mark.slow
def test_each_run_records_the_prepared_dataset_as_its_input(trained):
    tracker, outcome, _ = trained
    dataset = open_dataset("synthetic")
    for run_id in [outcome.parent_run_id, *(s.run_id for s in outcome.seeds)]:
        inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
        assert len(inputs) == 1
        recorded = inputs[0].dataset
        assert recorded.name == "synthetic"
        assert recorded.digest == dataset.checksum[:DATASET_DIGEST_LENGTH]
        assert recorded.source_type == "local" and str(dataset.path) in recorded.source
        assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}


@pytest.mark.slow
def test_the_logged_model_reloads_and_predicts_as_the_trainer_did(trained, monkeypatch):
    tracker, outcome, predictions = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)  # for MLflow's own loader and its models:/ URIs
    test = open_dataset("synthetic").split("test")
    for seed in outcome.seeds:
        model_id = tracker.logged_model_id(seed.run_id)
        assert model_id is not None
        logged = tracker.client.get_logged_model(model_id)
        assert logged.source_run_id == seed.run_id and logged.status == "READY"
        assert logged.metrics and {m.key for m in logged.metrics} >= {"val_selected/test_acc", "val_selected/val_acc"}
        outputs = tracker.client.get_run(seed.run_id).outputs.model_outputs
        assert [(o.model_id, o.step) for o in outputs] == [(model_id, int(seed.final["best_epoch"]))]

        # MLflow's own loader, through the model's URI
        model = mlflow.pyfunc.load_model(f"models:/{model_id}")
        rows, expected = predictions[seed.seed]
        scores = model.predict({m: np.asarray(a[rows]) for m, a in test.inputs.items()})
        assert scores.dtype == np.float32 and scores.shape == expected.shape
        # the same batch through the same code: bit for bit on the CPU (bf16 autocast on CUDA may round apart)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=0 if not torch.cuda.is_available() else 1e-2)
        assert (scores.argmax(1) == expected.argmax(1)).all()

        # the whole test split scores what the trainer logged at the best epoch
        everything = tracker.load_model(model_id).predict({m: np.asarray(a) for m, a in test.inputs.items()})
        assert float((everything.argmax(1) == np.asarray(test.labels)).mean()) == pytest.approx(seed.final["test_acc"])
    on_cpu = tracker.load_model(model_id, device="cpu")  # the recorded train.device, overridden
    assert on_cpu.predict({m: np.asarray(a[:5]) for m, a in test.inputs.items()}).shape == (5, 8)


@pytest.mark.slow
def test_the_logged_model_and_the_run_share_one_copy_of_the_best_weights(trained):
    tracker, outcome, _ = trained
    for seed in outcome.seeds:
        logged = tracker.client.get_logged_model(tracker.logged_model_id(seed.run_id))
        in_model = local_path(logged.artifact_location) / "artifacts" / "best.pt"
        in_run = local_path(tracker.get_run(seed.run_id).artifact_uri) / "checkpoints" / "best.pt"
        assert in_model.samefile(in_run)  # one file under two names: its bytes are on disk once
        assert in_model.stat().st_nlink == 2


@pytest.mark.slow
def test_register_puts_a_model_version_in_the_registry(trained, monkeypatch):
    tracker, outcome, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    seed = outcome.seeds[1]
    result = CliRunner().invoke(register_command, [seed.run_id, "--name", "synthetic-lb"])
    assert result.exit_code == 0, result.output
    assert "registered synthetic-lb version 1: models:/synthetic-lb/1" in result.output
    version = tracker.client.get_model_version("synthetic-lb", "1")
    assert version.run_id == seed.run_id and version.source == f"models:/{tracker.logged_model_id(seed.run_id)}"

    # a parent run: the seed with the best validation score, never test
    registered = scoring.register(outcome.parent_run_id, "synthetic-lb", tracker=tracker)
    best = max(outcome.seeds, key=lambda s: (s.final["val_acc"], -s.seed))
    assert (registered.version, registered.run_id, registered.seed) == ("2", best.run_id, best.seed)
    assert registered.parent_id == outcome.parent_run_id and "validation acc" in registered.chosen_by
    assert sorted(str(v.version) for v in tracker.client.search_model_versions("name = 'synthetic-lb'")) == ["1", "2"]
    model = mlflow.pyfunc.load_model("models:/synthetic-lb/2")
    inputs = {m: np.asarray(a[:3]) for m, a in open_dataset("synthetic").split("test").inputs.items()}
    assert model.predict(inputs).shape == (3, 8)

    with pytest.raises(DmglError, match="not made by `dmgl train`"):
        scoring.register(tracker.start_run(tracker.experiment_id("other"), "x", {}), "x", tracker=tracker)


# --------------------------------------------------------------------------------------- description and names


@pytest.mark.slow
def test_the_parent_describes_its_seeds_in_markdown(trained):
    tracker, outcome, _ = trained
    parent = tracker.get_run(outcome.parent_run_id)
    note = parent.tags["mlflow.note.content"]
    assert "&ensp;ACC&ensp;" in note  # cells padded: the UI draws a description's table without padding
    note = re.sub(" +", " ", note.replace("&ensp;", ""))  # the cells' text, as the UI shows it
    assert "| ACC | MAP | F1 | ACC fast | ACC slow | Gap ACC |" in note
    mean, std = outcome.summary["test_acc"], outcome.summary["test_acc_std"]
    assert f"| mean ± std (2 seeds) | {mean * 100:.2f}% ± {std * 100:.2f}% |" in note
    for seed in outcome.seeds:
        assert f"[seed {seed.seed}](#/experiments/{parent.experiment_id}/runs/{seed.run_id})" in note
    assert f"![alpha per epoch](get-artifact?path=alpha.png&run_uuid={parent.run_id})" in note


@pytest.mark.slow
def test_params_hold_only_the_settings_that_apply(trained):
    tracker, outcome, _ = trained
    for run_id in [outcome.parent_run_id, *(s.run_id for s in outcome.seeds)]:
        params = tracker.get_run(run_id).params
        assert "strategy.alpha" not in params and "strategy.p" not in params
        assert params["strategy.name"] == "lb" and "strategy.lb.approx" in params
        assert not any(k.startswith("method.options.") and not k.startswith("method.options.concat.") for k in params)


def test_run_names_are_short_and_tell_strategies_apart():
    def name(spec: str) -> str:
        return default_run_name(resolve("synthetic", strategy=parse_strategy(spec), method="concat"))

    assert name("constant:0.5") == "concat-constant-0.5"
    assert name("constant:0") == "concat-constant-0"
    assert name("stepwise:0.95") == "concat-stepwise-0.95"
    assert name("heuristic") == "concat-heuristic"
    assert name("lb") == "concat-lb"
    assert _run_name("synthetic-20261201-222816", 3, StrategySpec("stepwise", 0.95)).startswith("t3-stepwise-0.95-")
    assert re.fullmatch("t0-lb-[0-9a-f]{6}", _run_name("a-study", 0, StrategySpec("lb")))  # the study's tag last
    config = resolve("synthetic", strategy=parse_strategy("stepwise:0.95"))
    assert "strategy.p" in recorded_params(config) and "strategy.alpha" not in recorded_params(config)


@pytest.mark.slow
def test_recorded_run_names(trained):
    tracker, outcome, _ = trained
    assert tracker.get_run(outcome.parent_run_id).name == "concat-lb"
    assert [tracker.get_run(s.run_id).name for s in outcome.seeds] == ["concat-lb-seed0", "concat-lb-seed1"]
    names = {m.name for m in tracker.client.search_logged_models([outcome.experiment_id])}
    assert names == {"concat-lb-seed0", "concat-lb-seed1"}


@pytest.mark.slow
def test_a_constant_run_is_named_by_its_alpha_and_logs_its_setting(run_cli, synthetic):
    result = run_cli("train", "--strategy", "constant:0.5", "--epochs", "1", "--set", "train.batch_size=64")
    assert "warning" not in result.output
    tracker = Tracker()
    announced = re.search(r"parent run ([0-9a-f]{32})", result.output)
    assert announced is not None
    parent = tracker.get_run(announced.group(1))
    assert parent.name == "concat-constant-0.5"
    (seed,) = tracker.children(parent.run_id)
    assert seed.name == "concat-constant-0.5-seed0"
    assert seed.params["strategy.alpha"] == "0.5" and "strategy.p" not in seed.params
    assert not any(k.startswith("strategy.lb.") for k in seed.params)
    model_id = tracker.logged_model_id(seed.run_id)
    assert model_id is not None and tracker.client.get_logged_model(model_id).name == "concat-constant-0_5-seed0"


def test_a_description_of_many_seeds_fits_in_a_tag():
    config = resolve("synthetic", strategy=parse_strategy("stepwise:0.95"))
    final = {
        "test_acc": 0.5,
        "test_map": 0.6,
        "test_f1": 0.4,
        "test_acc_a": 0.3,
        "test_acc_b": 0.2,
        "test_gap_acc": 0.1,
    }
    few = [SeedOutcome(seed, f"{seed:032x}", final) for seed in range(3)]
    text = summary.parent_description(config, "1", few, "alpha.png")
    assert "concat · h(0.95) on synthetic" in text and text.count("[seed ") == 3
    assert "| ACC | MAP | F1 | ACC a | ACC b | Gap ACC |" in re.sub(" +", " ", text.replace("&ensp;", ""))
    many = [SeedOutcome(seed, f"{seed:032x}", final) for seed in range(100)]
    text = summary.parent_description(config, "1", many, "alpha.png")
    assert len(text) <= summary.DESCRIPTION_LIMIT and "mean ± std (100 seeds)" in text and "[seed " not in text
