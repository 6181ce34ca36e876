"""A run is named by its whole id, a unique id prefix (6+ characters) or its unique name, wherever a command takes a
run id; an ambiguous or unknown one is one clear error. Sweep trial names differ across studies, and `runs compare`
compares only the settings that apply to every run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dmgl_cli.cli import cli
from dmgl_cli.errors import DmglError
from dmgl_cli.strategies import parse_strategy
from dmgl_cli.sweep.worker import _run_name
from dmgl_cli.tracking import RUN_ID_PREFIX_MIN, SHOWN_CANDIDATES, Tracker
from dmgl_cli.tracking.store_reader import SqliteStoreReader

ROOT = Path(__file__).resolve().parent.parent
MLFLOW_PACKAGES = {"mlflow", "sqlalchemy", "alembic"}


def _parent(tracker: Tracker, experiment_id: str, name: str, strategy: str, params: dict[str, object]) -> str:
    run_id = tracker.start_run(
        experiment_id,
        name,
        {"dmgl.role": "parent", "dmgl.strategy": strategy, "dmgl.method": "concat", "dmgl.seeds": "0"},
    )
    tracker.log_params(run_id, {"strategy.name": strategy, "method.name": "concat", "optim.lr": 0.01, **params})
    tracker.end_run(run_id, "FINISHED")
    return run_id


@pytest.fixture
def store(registry):
    """Runs named as dmgl names them: one LB and one constant run, and a name given to seven runs."""
    tracker = Tracker()
    experiment_id = tracker.experiment_id("refs")
    runs = {
        "lb": _parent(tracker, experiment_id, "concat-lb", "lb", {"strategy.lb.alpha_lr": 0.05}),
        "constant": _parent(tracker, experiment_id, "concat-constant-0.5", "constant", {"strategy.alpha": 0.5}),
    }
    repeated = [_parent(tracker, experiment_id, "again", "lb", {}) for _ in range(SHOWN_CANDIDATES + 2)]
    return tracker, runs, repeated


def _json(*args: str) -> dict:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_run_is_found_by_id_prefix_or_name(store):
    tracker, runs, _ = store
    lb = runs["lb"]
    for reference in (lb, lb[:RUN_ID_PREFIX_MIN], lb[:12], "concat-lb", f"  {lb[:8]} "):
        assert tracker.find_run(reference).run_id == lb
    assert _json("runs", "show", lb[:8], "--json")["run_id"] == lb
    assert _json("runs", "show", "concat-constant-0.5", "--json")["run_id"] == runs["constant"]


def test_an_ambiguous_name_lists_some_candidates_and_the_command(store, run_cli):
    _, _, repeated = store
    output = run_cli("runs", "show", "again", expect=1).output
    assert output.count("Error:") == 1 and "fits more than one run" in output
    listed = [run_id for run_id in repeated if run_id in output]
    assert len(listed) == SHOWN_CANDIDATES and "... and more" in output
    assert "`dmgl runs list --role all`" in output


def test_an_unknown_or_too_short_reference_says_so(store, run_cli):
    _, runs, _ = store
    assert "does not exist" in run_cli("runs", "show", "ffffffffff", expect=1).output
    short = run_cli("runs", "show", runs["lb"][:3], expect=1).output
    assert "does not exist" in short and f"at least {RUN_ID_PREFIX_MIN} characters" in short
    with pytest.raises(DmglError, match="does not exist"):
        store[0].find_run("0123456789abcdef0123456789abcdef")


@pytest.mark.parametrize(
    "command",
    [
        ["eval"],
        ["register", "--name", "m"],
        ["explain"],
        ["train", "--resume"],
        ["runs", "compare", "concat-lb"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_every_command_that_takes_a_run_id_resolves_it_alike(store, run_cli, command):
    output = run_cli(*command, "again", expect=1).output
    assert "fits more than one run" in output and "Traceback" not in output


def test_runs_compare_takes_prefixes_and_compares_only_shared_settings(store):
    _, runs, _ = store
    comparison = _json("runs", "compare", runs["lb"][:8], "concat-constant-0.5", "--json")
    assert [r["run_id"] for r in comparison["runs"]] == [runs["lb"], runs["constant"]]
    # strategy.lb.* is no setting of the constant run, strategy.alpha none of the LB run: neither is a difference
    assert comparison["params"] == {"strategy.name": ["lb", "constant"]}
    assert comparison["same_params"] == 2  # method.name, optim.lr


def test_the_same_run_twice_is_refused_even_by_two_references(store, run_cli):
    _, runs, _ = store
    output = run_cli("runs", "compare", runs["lb"], "concat-lb", expect=1).output
    assert "named more than once" in output


def test_trial_names_differ_across_studies():
    spec = parse_strategy("stepwise:0.95")
    first, second = _run_name("synthetic-20261204-0551", 3, spec), _run_name("synthetic-20261204-0612", 3, spec)
    assert first.startswith("t3-stepwise-0.95-") and second.startswith("t3-stepwise-0.95-")
    assert first != second
    assert _run_name("synthetic-20261204-0551", 3, spec) == first  # one study, one name


def _fresh_process(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python -m dmgl_cli ARGS`` as a user runs it, in a fresh process; with the top-level packages it imported
    (read from ``-X importtime``, which writes them to stderr; the command's own stderr is left in the result)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dmgl_cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    timings = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in timings if line.count("|") == 2}
    stderr = "".join(f"{line}\n" for line in done.stderr.splitlines() if not line.startswith("import time:"))
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout, stderr), imported


def test_reading_commands_on_a_local_store_answer_without_mlflow_as_mlflow_would(store, monkeypatch):
    """``runs list/show/compare`` (an unknown run too) on the local SQLite store read it with the standard library
    (:class:`SqliteStoreReader`): MLflow is not imported, and what they print is what reading through MLflow's client
    prints (the same commands in this process with the reader turned off)."""
    tracker, runs, repeated = store
    lb = runs["lb"]
    seed = tracker.start_run(
        tracker.experiment_id("refs"),
        "concat-lb-seed0",
        {"dmgl.role": "seed", "dmgl.seed": "0", "dmgl.strategy": "lb", "dmgl.method": "concat"},
        parent_id=lb,
    )
    tracker.log_params(seed, {"strategy.name": "lb", "train.seed": 0})
    for step in range(3):
        tracker.log_metrics(seed, {"val_acc": 0.5 + step / 10, "train_loss": 1.0 - step / 10, "alpha": 0.5}, step)
    tracker.log_metrics(seed, {"final_test_acc": 0.61, "final_val_acc": 0.6})
    tracker.end_run(seed, "FINISHED")
    tracker.log_metrics(lb, {"final_test_acc": 0.61, "final_test_acc_std": 0.0})
    tracker.client.delete_run(repeated[0])
    commands = [
        ("runs", "list", "--json"),
        ("runs", "list", "--role", "all", "--status", "finished", "-n", "4", "--json"),
        ("runs", "list", "--role", "seed"),
        ("runs", "show", lb[:8]),
        ("runs", "show", lb[:8], "--json"),
        ("runs", "show", seed, "--json"),
        ("runs", "show", "concat-constant-0.5", "--json"),
        ("runs", "compare", lb[:8], runs["constant"], seed[:10], "--json"),
        ("runs", "show", "ffffffffff"),  # an unknown prefix
        ("runs", "show", "f" * 32),  # an unknown whole id
        ("runs", "show", "again"),  # a name of several runs
    ]
    answers = {command: _fresh_process(*command) for command in commands}
    deleted, deleted_imports = _fresh_process("runs", "show", repeated[0], "--json")

    monkeypatch.setattr(SqliteStoreReader, "open", staticmethod(lambda uri: None))  # read through MLflow
    for command, (done, imported) in answers.items():
        assert not imported & MLFLOW_PACKAGES, f"dmgl {' '.join(command)} imported {imported & MLFLOW_PACKAGES}"
        expected = CliRunner().invoke(cli, list(command))
        assert (done.returncode, done.stdout, done.stderr) == (expected.exit_code, expected.stdout, expected.stderr)
        assert done.returncode == (1 if command[-1] in ("ffffffffff", "f" * 32, "again") else 0), done.stderr
    assert "does not exist" in answers[("runs", "show", "f" * 32)][0].stderr
    shown = json.loads(answers[("runs", "show", lb[:8], "--json")][0].stdout)
    assert [child["run_id"] for child in shown["children"]] == [seed]
    assert json.loads(answers[("runs", "show", seed, "--json")][0].stdout)["metrics"]["val_acc"] == pytest.approx(0.7)
    # a deleted run is still shown by its whole id, as MLflow's client gives it (read through MLflow)
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["run_id"] == repeated[0] and "mlflow" in deleted_imports
    assert deleted.stdout == CliRunner().invoke(cli, ["runs", "show", repeated[0], "--json"]).stdout
