"""Every user error ends in one clear message, a non-zero exit, no traceback and nothing half-written."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from dmgl_cli.tracking import Tracker, local_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--recipe", "nope"], "unknown recipe 'nope'; built-in recipes: "),
        (
            ["train", "--strategy", "magic"],
            "unknown strategy 'magic'; valid: constant, stepwise, heuristic, linear, lb",
        ),
        (["train", "--strategy", "constant", "--alpha", "1.5"], r"alpha must be in [0, 1], got 1.5"),
        (["train", "--strategy", "constant", "--alpha", "-0.1"], r"alpha must be in [0, 1], got -0.1"),
        (["train", "--strategy", "stepwise", "--p", "2"], r"p must be in [0, 1], got 2"),
        (["train", "--strategy", "lb", "--alpha", "0.5"], "--alpha applies to --strategy constant"),
        (["train", "--strategy", "heuristic", "--p", "0.5"], "--p applies to --strategy stepwise"),
        (["train", "--seeds", "0"], "--seeds must be >= 1"),
        (["train", "--seeds", "two"], "--seeds must be a count"),
        (["train", "--method", "nope"], "unknown method 'nope'; valid: "),
        (["train", "--set", "train.epochs=-1"], "train.epochs must be >= 1"),
        (["train", "--set", "nonsense"], "must look like key=value"),
        (["prepare", "imagenet"], "unknown dataset 'imagenet'; preparers: "),
        (["prepare", "synthetic", "--name", "../escape"], "dataset name '../escape' is not allowed"),
        (["prepare", "synthetic", "-o", "modalities=5"], "option modalities must be 2 or 3"),
        (["prepare", "synthetic", "-o", "colour=red"], "unknown option colour for `dmgl prepare synthetic`"),
        (["prepare", "synthetic", "--raw", "/definitely/not/here"], "raw folder /definitely/not/here does not exist"),
        (["eval", "0123456789abcdef0123456789abcdef"], "run '0123456789abcdef0123456789abcdef' does not exist"),
        (["train", "--resume", "0123456789abcdef0123456789abcdef"], "does not exist"),
        (["datasets", "show", "nothing"], "dataset 'nothing' is not prepared"),
        (["recipes", "show", "nope"], "unknown recipe 'nope'"),
        (["ui", "--host", "0.0.0.0"], "add --allow-remote to confirm"),
        (["train", "--experiment", "../outside"], "experiment '../outside' is not allowed"),
        (["train", "--experiment", "/abs/path"], "experiment '/abs/path' is not allowed"),
        (["train", "--set", "dataset=a#b"], "dataset 'a#b' is not allowed"),
        (["train", "--name", "..\\up"], "is not allowed"),
        (["prepare", "synthetic", "--name", "/etc"], "dataset name '/etc' is not allowed"),
    ],
)
def test_bad_input_gives_one_clear_message(run_cli, args, message):
    result = run_cli(*args, expect=1)
    assert message in result.output, result.output
    assert result.output.count("Error:") == 1


def test_training_an_unprepared_dataset_says_which_prepare_to_run(run_cli):
    result = run_cli("train", "--recipe", "synthetic", expect=1)
    assert "dataset 'synthetic' is not prepared" in result.output
    assert "run `dmgl prepare synthetic` first" in result.output


def test_resume_refuses_new_settings(run_cli, synthetic):
    result = run_cli("train", "--resume", "abc", "--epochs", "3", expect=1)
    assert "drop --epochs" in result.output


def test_registry_that_cannot_be_written(run_cli, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DMGL_HOME", str(blocker / "registry"))
    result = run_cli("prepare", "synthetic", expect=1)
    assert "registry folder" in result.output and "is not writable" in result.output


def _trained_child(run_cli, *extra):
    result = run_cli("train", "--strategy", "heuristic", "--epochs", "1", *extra)
    parent_id = re.search(r"parent run ([0-9a-f]{32})", result.output).group(1)
    return Tracker().children(parent_id)[0]


@pytest.mark.slow
def test_corrupt_checkpoint_is_refused(run_cli, synthetic):
    child = _trained_child(run_cli)
    best = local_path(child.artifact_uri) / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:100])
    result = run_cli("eval", child.run_id, expect=1)
    assert "is corrupt or not a dmgl checkpoint" in result.output


@pytest.mark.slow
def test_foreign_checkpoint_is_refused(run_cli, synthetic):
    small = _trained_child(run_cli, "--set", "model.embed_dim=8")
    large = _trained_child(run_cli, "--set", "model.embed_dim=16")
    source = local_path(small.artifact_uri) / "checkpoints" / "best.pt"
    target = local_path(large.artifact_uri) / "checkpoints" / "best.pt"
    shutil.copyfile(source, target)
    result = run_cli("eval", large.run_id, expect=1)
    assert "was made for another model" in result.output


@pytest.mark.slow
def test_a_pickled_object_is_not_loaded(run_cli, synthetic):
    child = _trained_child(run_cli)
    best = local_path(child.artifact_uri) / "checkpoints" / "best.pt"
    torch.save({"format": "dmgl-checkpoint", "version": 1, "payload": object()}, best)
    result = run_cli("eval", child.run_id, expect=1)
    assert "is corrupt or not a dmgl checkpoint" in result.output


def test_failed_prepare_leaves_no_dataset(run_cli, registry):
    run_cli("prepare", "synthetic", "-o", "samples=10", expect=1)
    assert not (registry / "datasets" / "synthetic").exists()
    assert not list((registry / "datasets").glob(".tmp-*"))


@pytest.mark.slow
def test_a_bad_method_setting_creates_no_run(run_cli, synthetic, registry):
    result = run_cli(
        "train",
        "--method",
        "ogm-ge",
        "--set",
        "method.options.ogm-ge.start_epoch=3",
        "--set",
        "method.options.ogm-ge.end_epoch=2",
        expect=1,
    )
    assert "method.options.ogm-ge.end_epoch (2) must be >= method.options.ogm-ge.start_epoch (3)" in result.output
    assert "parent run" not in result.output
    assert not (registry / "mlflow.db").exists() or not Tracker().search(
        [e.experiment_id for e in Tracker().client.search_experiments()]
    )
