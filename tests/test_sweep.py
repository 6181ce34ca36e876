"""`dmgl sweep`: real Optuna storages (SQLite, journal file), real MLflow runs, real worker processes.

Optuna is imported here only to read back what the sweep wrote (dmgl_cli itself imports it only in sweep/).
"""

from __future__ import annotations

import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from tiny import tiny_run

from dmgl_cli.paths import repo_root
from dmgl_cli.tracking import Tracker

FAST = tiny_run(epochs=2)


def _study(storage: str, name: str) -> optuna.Study:
    if storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(storage[len("journal:") :]))
    return optuna.load_study(study_name=name, storage=storage)


def _worker(*args: str, **kwargs) -> subprocess.Popen:
    """A `dmgl sweep` worker in its own process (inherits DMGL_HOME from the registry fixture)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dmgl_cli", "sweep", *args],
        cwd=repo_root(),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"worker did not finish in {timeout}s:\n{output}") from None
    assert process.returncode == 0, f"worker exited {process.returncode}:\n{output}"
    return output


def _wait_for(predicate, what: str, timeout: float = 120, process: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"worker exited ({process.returncode}) before {what}:\n{process.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _trial_started(storage: str, name: str):
    """A RUNNING trial whose MLflow run exists and whose first seed has logged an epoch: training is under way."""
    tracker = Tracker()
    for trial in _study(storage, name).get_trials(states=(TrialState.RUNNING,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        # any epoch's metrics: a constant:0 trial logs no alpha, and waiting for the next trial's could outlast it
        if run_id and any(c.metrics for c in tracker.children(run_id)):
            return trial
    return None


# ---------------------------------------------------------------------------------------------- grid


@pytest.mark.slow
def test_grid_sweep_runs_one_trial_per_strategy_nested_in_mlflow(run_cli, synthetic, registry):
    result = run_cli("sweep", "--strategies", "constant:0,heuristic,lb", "--seeds", "2", "--study", "grid", *FAST)
    lines = [line for line in result.output.splitlines() if line.startswith("trial ")]
    assert len(lines) == 3 and all("val acc" in line for line in lines)
    assert "Sweep grid: best trial per strategy" in result.output and "study grid is complete" in result.output
    assert "(best on val ACC) significantly beats" in result.output and "Holm-adjusted" in result.output

    study = _study(f"sqlite:///{registry / 'optuna.db'}", "grid")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert sorted(t.params["strategy"] for t in trials) == ["constant:0", "heuristic", "lb"]
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE

    tracker = Tracker()
    sweep_run_id = study.user_attrs["mlflow_sweep_run_id"]
    sweep_run = tracker.get_run(sweep_run_id)
    assert sweep_run.status == "FINISHED"
    assert sweep_run.tags["dmgl.role"] == "sweep" and sweep_run.tags["dmgl.sweep"] == "grid"
    assert sweep_run.params["strategies"] == "constant:0,heuristic,lb"
    best = max(trials, key=lambda t: t.value)
    assert sweep_run.tags["dmgl.best_trial"] == str(best.number)
    assert sweep_run.tags["dmgl.best_run_id"] == best.user_attrs["mlflow_run_id"]
    assert math.isclose(sweep_run.metrics["best_val_acc"], best.value)

    trial_runs = tracker.children(sweep_run_id)
    assert len(trial_runs) == 3
    assert {r.run_id for r in trial_runs} == {t.user_attrs["mlflow_run_id"] for t in trials}
    for trial in trials:
        parent = tracker.get_run(trial.user_attrs["mlflow_run_id"])
        tags = parent.tags
        assert tags["dmgl.role"] == "parent" and tags["mlflow.parentRunId"] == sweep_run_id
        assert tags["dmgl.sweep"] == "grid" and tags["dmgl.trial"] == str(trial.number)
        seeds = tracker.children(parent.run_id)
        assert [s.tags["dmgl.role"] for s in seeds] == ["seed", "seed"]
        assert sorted(s.tags["dmgl.seed"] for s in seeds) == ["0", "1"]
        assert all(s.tags["dmgl.sweep"] == "grid" and s.status == "FINISHED" for s in seeds)
        # the objective is the mean validation score of the seeds, never test
        val = [s.metrics["final_val_acc"] for s in seeds]
        assert math.isclose(trial.value, sum(val) / 2)
        # its std and per-seed values, for the summary's paired tests
        assert math.isclose(trial.user_attrs["val_std"], statistics.stdev(val))
        assert trial.user_attrs["val_by_seed"] == {s.tags["dmgl.seed"]: s.metrics["final_val_acc"] for s in seeds}
        assert trial.user_attrs["seed_run_ids"] == [s.run_id for s in seeds]

    # running the study again continues it: nothing is left, so nothing is added or rerun
    again = run_cli("sweep", "--study", "grid")
    assert "this worker ran 0 trial(s)" in again.output
    assert len(_study(f"sqlite:///{registry / 'optuna.db'}", "grid").get_trials()) == 3


def test_a_single_strategy_grid(run_cli, synthetic, registry):
    run_cli("sweep", "--strategies", "heuristic", "--study", "one", "--set", "train.epochs=1")
    (trial,) = _study(f"sqlite:///{registry / 'optuna.db'}", "one").get_trials()
    assert trial.state == TrialState.COMPLETE and trial.params == {"strategy": "heuristic"}


@pytest.mark.slow
def test_tuning_samples_per_strategy_ranges_and_reports_every_epoch(run_cli, synthetic, registry):
    first = run_cli(
        "sweep",
        "--strategies",
        "lb",
        "--tune",
        "lr=0.01:0.1,alpha_lr",
        "--n-trials",
        "2",
        "--seeds",
        "1",
        "--study",
        "tune",
        *FAST,
    )
    # live progress: one line per epoch of the running trial, before the trial's own line
    for number in (0, 1):
        epochs = [line for line in first.output.splitlines() if line.startswith(f"  trial {number} LB  seed 0 (1/1)")]
        assert [line.split("epoch ")[1].split()[0] for line in epochs] == ["1/2", "2/2"], first.output
        assert all(re.search(r"val acc \d\.\d{4} \(best \d\.\d{4}\)$", line) for line in epochs)
    trials = _study(f"sqlite:///{registry / 'optuna.db'}", "tune").get_trials()
    assert len(trials) == 2 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    for trial in trials:
        assert set(trial.params) == {"strategy", "lr@lb", "alpha_lr@lb"}
        assert 0.01 <= trial.params["lr@lb"] <= 0.1 and 0.005 <= trial.params["alpha_lr@lb"] <= 0.5
        assert sorted(trial.intermediate_values) == [1, 2]  # one report per epoch
        run = Tracker().get_run(trial.user_attrs["mlflow_run_id"])
        assert math.isclose(float(run.params["optim.lr"]), trial.params["lr@lb"])
    assert trials[0].params["lr@lb"] != trials[1].params["lr@lb"]
    # raising the count of an existing study queues just the difference
    more = run_cli("sweep", "--study", "tune", "--n-trials", "3")
    assert "re-enqueued 1 trial(s)" in more.output and "this worker ran 1 trial(s)" in more.output
    study = _study(f"sqlite:///{registry / 'optuna.db'}", "tune")
    assert len(study.get_trials()) == 3
    # the finished study's sweep run: the summary as its description, Optuna's figures of the tuned settings
    sweep_run = Tracker().get_run(study.user_attrs["mlflow_sweep_run_id"])
    description = sweep_run.tags["mlflow.note.content"]
    assert "Sweep tune: best trial per strategy" in description and "LB" in description
    assert "optuna/lb-importance.png" in description
    # (median pruning starts after 3 complete trials of a strategy, so all 3 complete: enough to draw)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3
    drawn = {p.name for p in registry.glob("artifacts/**/optuna/*.png")}
    assert drawn == {"lb-importance.png", "lb-parallel-coordinate.png"}
    assert "it can only be raised" in run_cli("sweep", "--study", "tune", "--n-trials", "1", expect=1).output


def test_strategy_median_pruner_compares_a_trial_with_its_own_strategy():
    from dmgl_cli.sweep.worker import StrategyMedianPruner

    study = optuna.create_study(direction="maximize")
    strategy = optuna.distributions.CategoricalDistribution(["lb", "constant:0"])

    def finished(name: str, value: float):
        study.add_trial(
            optuna.trial.create_trial(
                params={"strategy": name},
                distributions={"strategy": strategy},
                value=value,
                intermediate_values={1: value, 2: value},
            )
        )

    for value in (0.5, 0.6, 0.7):
        finished("lb", value)
    for value in (0.1, 0.1, 0.1):
        finished("constant:0", value)
    pruner = StrategyMedianPruner(n_startup_trials=3, n_warmup_steps=1)

    def running(name: str, values: dict[int, float]):
        return optuna.trial.create_trial(
            state=TrialState.RUNNING,
            params={"strategy": name},
            distributions={"strategy": strategy},
            intermediate_values=values,
        )

    assert pruner.prune(study, running("lb", {1: 0.3, 2: 0.3}))  # below lb's median 0.6
    assert not pruner.prune(study, running("lb", {1: 0.3, 2: 0.65}))
    assert not pruner.prune(study, running("constant:0", {1: 0.3, 2: 0.3}))  # above its own strategy's 0.1
    assert not pruner.prune(study, running("lb", {1: 0.0}))  # warm-up step


def test_pruned_training_marks_runs_killed_not_failed(synthetic, registry):
    from dmgl_cli.config import resolve
    from dmgl_cli.run import training
    from dmgl_cli.sweep.worker import PrunedTrial

    def progress(seed, epoch, total, metrics):
        raise PrunedTrial("stop")

    config = resolve("synthetic", ["train.epochs=2"])
    parents = []
    tracker = Tracker()
    with pytest.raises(optuna.TrialPruned):
        training.train(config, [0], tracker=tracker, progress=progress, on_parent=parents.append)
    assert tracker.status(parents[0]) == "KILLED"
    assert [c.status for c in tracker.children(parents[0])] == ["KILLED"]


# ------------------------------------------------------------------------------------- several workers


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_workers_on_one_study_share_the_trials(run_cli, synthetic, registry, kind):
    storage = f"journal:{registry / 'optuna.log'}" if kind == "journal" else f"sqlite:///{registry / 'optuna.db'}"
    run_cli(
        "sweep",
        "--study",
        "shared",
        "--storage",
        storage,
        "--strategies",
        "constant:0,heuristic,lb",
        "--seeds",
        "1",
        *FAST,
        "--create-only",
    )
    assert len(_study(storage, "shared").get_trials(states=(TrialState.WAITING,))) == 3
    workers = [_worker("--study", "shared", "--storage", storage) for _ in range(2)]
    outputs = [_finish(w) for w in workers]

    trials = _study(storage, "shared").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # none lost, none duplicated, no extra trial
    assert sorted(t.params["strategy"] for t in trials) == ["constant:0", "heuristic", "lb"]
    ran = sum(line.startswith("trial ") for output in outputs for line in output.splitlines())
    assert ran == 3
    tracker = Tracker()
    sweep_run_id = _study(storage, "shared").user_attrs["mlflow_sweep_run_id"]
    assert sorted(r.run_id for r in tracker.children(sweep_run_id)) == sorted(
        t.user_attrs["mlflow_run_id"] for t in trials
    )
    assert tracker.status(sweep_run_id) == "FINISHED"


@pytest.mark.integration
def test_a_killed_workers_trial_is_failed_retried_and_does_not_block(run_cli, synthetic, registry):
    storage = f"journal:{registry / 'optuna.log'}"
    run_cli(
        "sweep",
        "--study",
        "kill",
        "--storage",
        storage,
        "--strategies",
        "constant:0,lb",
        "--seeds",
        "1",
        "--set",
        "train.epochs=6",
        "--heartbeat",
        "1",
        "--create-only",
    )
    doomed = _worker("--study", "kill", "--storage", storage)
    victim = _wait_for(lambda: _trial_started(storage, "kill"), "a trial to start training", process=doomed)
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()

    # another worker finishes the study: it runs the other trial, waits out the 3 s grace period, then the retry
    output = run_cli("sweep", "--study", "kill", "--storage", storage).output
    trials = _study(storage, "kill").get_trials()
    states = {t.number: t.state for t in trials}
    assert states[victim.number] == TrialState.FAIL
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["strategy"] for t in complete) == ["constant:0", "lb"]
    retry = next(t for t in complete if t.params["strategy"] == victim.params["strategy"])
    assert retry.system_attrs["failed_trial"] == victim.number
    assert "study kill is complete" in output
    # the dead trial's MLflow runs no longer claim to be running
    tracker = Tracker()
    dead = victim.user_attrs["mlflow_run_id"]
    assert tracker.status(dead) == "FAILED"
    assert all(c.status != "RUNNING" for c in tracker.children(dead))


@pytest.mark.integration
def test_ctrl_c_requeues_the_trial_and_the_study_resumes(run_cli, synthetic, registry):
    storage = f"sqlite:///{registry / 'optuna.db'}"
    # Long trials, so that the signal lands inside one (it is honoured after the current optimiser step).
    run_cli(
        "sweep",
        "--study",
        "stop",
        "--strategies",
        "constant:0,lb",
        "--seeds",
        "1",
        "--set",
        "train.epochs=12",
        "--set",
        "train.batch_size=16",
        "--create-only",
    )
    worker = _worker("--study", "stop")
    victim = _wait_for(lambda: _trial_started(storage, "stop"), "a trial to start training", process=worker)
    worker.send_signal(signal.SIGINT)
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 130, output
    assert "dmgl sweep --study stop" in output and "Traceback" not in output

    study = _study(storage, "stop")
    assert study.get_trials()[victim.number].state == TrialState.FAIL
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert victim.params["strategy"] in [t.system_attrs["fixed_params"]["strategy"] for t in waiting]
    tracker = Tracker()
    assert tracker.status(victim.user_attrs["mlflow_run_id"]) == "KILLED"

    result = run_cli("sweep", "--study", "stop")
    assert "study stop is complete" in result.output
    complete = _study(storage, "stop").get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["strategy"] for t in complete) == ["constant:0", "lb"]


def test_ctrl_c_during_a_claim_puts_the_claimed_trial_back(run_cli, synthetic, registry, monkeypatch):
    """The signal lands just after the storage marked a trial RUNNING, before any heartbeat: the trial goes back to
    the queue (without the hold it stayed RUNNING with no heartbeat, and a resumed study waited for it for good)."""
    from dmgl_cli.sweep import worker

    storage = f"sqlite:///{registry / 'optuna.db'}"
    run_cli("sweep", "--study", "claim", "--strategies", "constant:0", "--seeds", "1", *FAST, "--create-only")
    claim = worker._claim

    def claim_then_ctrl_c(study):
        trial = claim(study)
        os.kill(os.getpid(), signal.SIGINT)  # delivered to this (the main) thread before the sleep ends
        time.sleep(0.2)
        return trial

    monkeypatch.setattr(worker, "_claim", claim_then_ctrl_c)
    result = run_cli("sweep", "--study", "claim", expect=130)
    assert "Traceback" not in result.output
    trials = _study(storage, "claim").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert "interrupted" in trials[0].user_attrs["message"] and "mlflow_run_id" not in trials[0].user_attrs

    monkeypatch.setattr(worker, "_claim", claim)
    assert "study claim is complete" in run_cli("sweep", "--study", "claim").output


# --------------------------------------------------------------------------------------------- bad input


def test_unknown_study_names_the_storage_and_how_to_create(run_cli, synthetic, registry):
    result = run_cli("sweep", "--study", "nope", expect=1)
    assert "unknown study 'nope'" in result.output and "--strategies" in result.output


@pytest.mark.parametrize(
    "spec, message",
    [
        ("constant:2", "must be in [0, 1]"),
        ("stepwise", "needs its p"),
        ("heuristic:0.3", "takes no value"),
        ("annealing", "unknown strategy 'annealing'"),
        ("lb,lb", "more than once"),
    ],
)
def test_bad_strategy_specs(run_cli, synthetic, spec, message):
    result = run_cli("sweep", "--strategies", spec, expect=1)
    assert message in result.output


def test_bad_tune_and_trial_counts(run_cli, synthetic):
    assert (
        "unknown hyperparameter 'momentum'"
        in run_cli("sweep", "--strategies", "lb", "--tune", "momentum", expect=1).output
    )
    assert "applies only to lb" in run_cli("sweep", "--strategies", "heuristic", "--tune", "alpha_lr", expect=1).output
    assert "only makes sense with --tune" in run_cli("sweep", "--strategies", "lb", "--n-trials", "3", expect=1).output
    assert "LOW must be > 0" in run_cli("sweep", "--strategies", "lb", "--tune", "lr=0:0.1", expect=1).output


@pytest.mark.parametrize(
    "url, message",
    [
        ("journal:/no/such/folder/optuna.log", "folder /no/such/folder does not exist"),
        ("sqlite:////no/such/folder/optuna.db", "cannot open Optuna storage sqlite:////no/such/folder/optuna.db"),
        ("postgresql://user:secret@127.0.0.1:1/db", "cannot open Optuna storage postgresql://user:***@127.0.0.1:1/db"),
        ("optuna.txt", "is not a storage URL"),
    ],
)
def test_storage_that_cannot_be_opened(run_cli, synthetic, url, message):
    result = run_cli("sweep", "--strategies", "lb", "--storage", url, expect=1)
    assert message in result.output
    assert "secret" not in result.output


def test_joining_with_other_settings_is_refused(run_cli, synthetic, registry):
    run_cli("sweep", "--study", "fixed", "--strategies", "constant:0,lb", *FAST, "--create-only")
    result = run_cli("sweep", "--study", "fixed", "--strategies", "lb", "--seeds", "3", expect=1)
    assert "--strategies (study has constant:0,lb)" in result.output and "--seeds (study has 0)" in result.output


def test_a_corrupt_journal_is_reported(run_cli, synthetic, tmp_path):
    journal = tmp_path / "broken.log"
    journal.write_text("this is not an optuna journal\n")
    result = run_cli("sweep", "--strategies", "lb", "--storage", f"journal:{journal}", expect=1)
    assert f"cannot open Optuna storage journal:{journal}" in result.output


def test_the_package_imports_optuna_only_in_sweep():
    """Only dmgl_cli/sweep/ imports Optuna (tests/test_architecture.py: only sweep/storage.py its private modules)."""
    package = Path(__file__).resolve().parent.parent / "dmgl_cli"
    users = sorted(
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if re.search(r"^\s*(import|from) optuna\b", p.read_text(), re.M)
    )
    assert users and all(name.startswith("sweep/") for name in users), users


# ----------------------------------------------------------------------------------------------- summary


def test_summary_shows_each_trials_std_and_which_strategies_the_best_significantly_beats():
    from scipy import stats as scipy_stats

    from dmgl_cli.stats import holm
    from dmgl_cli.sweep.space import SweepSettings
    from dmgl_cli.sweep.summary import summary_table
    from dmgl_cli.sweep.worker import TrialRecord
    from dmgl_cli.tables import render_text

    seeds = [0, 1, 2, 3]
    settings = SweepSettings(
        "synthetic",
        "",
        [],
        ["constant:0", "constant:0.5", "lb"],
        {},
        1,
        seeds,
        "acc",
        False,
        30,
        "x",
        "synthetic",
        "concat",
    )
    values = {
        "constant:0": [0.60, 0.66, 0.57, 0.63],
        "constant:0.5": [0.695, 0.735, 0.686, 0.724],  # within noise of LB's, seed by seed
        "lb": [0.70, 0.74, 0.69, 0.72],
    }
    records = []
    for number, (key, per_seed) in enumerate(values.items()):
        mean, std = sum(per_seed) / 4, float(scipy_stats.tstd(per_seed))
        records.append(
            TrialRecord(
                number,
                "COMPLETE",
                key,
                key,
                {},
                mean,
                std,
                run_id=f"r{number}",
                value_by_seed=dict(zip(seeds, per_seed, strict=True)),
            )
        )
    table = summary_table(records, settings, "s")
    text = render_text(table)
    lb_row = next(row for row in table.rows if row.stub[0] == "LB")
    assert lb_row.cells[0].std == pytest.approx(scipy_stats.tstd(values["lb"]))  # the trial's std over seeds
    assert lb_row.cells[0].ci is not None and "± " in text
    expected = holm([scipy_stats.ttest_rel(values["lb"], values[k]).pvalue for k in ("constant:0", "constant:0.5")])
    assert expected[0] < 0.05 < expected[1]
    note = table.notes[-1]
    assert note.startswith("LB (best on val ACC) significantly beats const 0 (+")
    assert "not significantly: const 0.5" in note and "Holm-adjusted" in note
    assert f"p={expected[0]:.3f}" in note or "p<0.001" in note
    one_seed = [
        TrialRecord(r.number, r.state, r.strategy, r.label, {}, r.value, None, value_by_seed={0: r.value})
        for r in records
    ]
    assert "no strategy is tested against it" in summary_table(one_seed, settings, "s").notes[-1]
