"""`dmgl sweep --devices`: one worker process per device on one study, real processes, real signals.

The launcher runs as a subprocess in its own process group (killed as a group in a finally); it starts its workers
in process groups of their own. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState
from processes import finish
from tiny import tiny_run

from dmgl_cli.paths import repo_root
from dmgl_cli.tracking import Tracker

TINY = ["--seeds", "1", *tiny_run(epochs=3)]


def _storage(registry) -> str:
    return f"sqlite:///{registry / 'optuna.db'}"


def _study(registry, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage(registry))


@contextlib.contextmanager
def _launcher(*args: str):
    """`dmgl sweep ...` in its own process group (inherits DMGL_HOME from the registry fixture)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dmgl_cli", "sweep", *args],
        cwd=repo_root(),
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=10)


def _finish(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    return finish(process, timeout, "dmgl sweep --devices")


def _gone(pid: int) -> bool:
    """The process has ended (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _worker_pids(launcher_pid: int) -> list[int]:
    """The launcher's children (its workers), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == launcher_pid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def _training(registry, name: str) -> list:
    """RUNNING trials whose first seed has logged an epoch: training is under way."""
    try:
        study = _study(registry, name)
    except KeyError:
        return []
    tracker = Tracker()
    found = []
    for trial in study.get_trials(states=(TrialState.RUNNING,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and any("alpha" in c.metrics for c in tracker.children(run_id)):
            found.append(trial)
    return found


@pytest.mark.integration
def test_two_cpu_workers_share_one_study(synthetic, registry):
    strategies = "constant:0,constant:1,heuristic,lb"
    with _launcher("--study", "pair", "--strategies", strategies, *TINY, "--devices", "cpu:2", "--json") as launcher:
        out, err = _finish(launcher, timeout=150)
        assert launcher.returncode == 0, f"{out}\n{err}"
    document = json.loads(out)
    assert "Traceback" not in err
    assert document["complete"] and not document["interrupted"]
    workers = document["workers"]
    assert [w["label"] for w in workers] == ["cpu#0", "cpu#1"] and all(w["exit_code"] == 0 for w in workers)
    assert all(_gone(w["pid"]) for w in workers)
    # each trial ran once, by one worker; both workers did some of them
    ran = [n for w in workers for n in w["trials"]]
    assert sorted(ran) == [0, 1, 2, 3] and all(w["trials"] for w in workers), workers
    assert "[cpu#0] trial" in err and "[cpu#1] trial" in err  # workers' lines are forwarded, prefixed

    study = _study(registry, "pair")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert sorted(t.params["strategy"] for t in trials) == sorted(strategies.split(","))
    # every trial recorded in MLflow once, under the sweep run, trained on its worker's device
    tracker = Tracker()
    sweep_run_id = study.user_attrs["mlflow_sweep_run_id"]
    runs = tracker.children(sweep_run_id)
    assert sorted(r.run_id for r in runs) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    assert all(r.params["train.device"] == "cpu" and r.status == "FINISHED" for r in runs)
    assert tracker.status(sweep_run_id) == "FINISHED"


@pytest.mark.integration
def test_ctrl_c_stops_every_worker_and_the_study_resumes(synthetic, registry):
    # Long enough trials that the signal lands inside one (it is honoured after the current optimiser step).
    slow = ["--seeds", "1", "--set", "train.epochs=12", "--set", "train.batch_size=16"]
    with _launcher("--study", "stop", "--strategies", "constant:0,heuristic", *slow, "--devices", "cpu:2") as first:
        deadline = time.time() + 90
        while not (victims := _training(registry, "stop")):
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "no trial started training in 90 s"
            time.sleep(0.3)
        workers = _worker_pids(first.pid)
        assert len(workers) == 2, workers
        first.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C delivers to the launcher
        out, err = _finish(first, timeout=90)
    said = f"launcher's output:\n{out}\n{err}"  # the workers' lines are forwarded into it, prefixed
    assert first.returncode == 130, said
    assert "Traceback" not in out + err, said
    assert "the study is resumable: `dmgl sweep --study stop --devices cpu:2`" in err, said
    assert all(_gone(pid) for pid in workers), said

    study = _study(registry, "stop")
    trials = study.get_trials()
    tracker = Tracker()
    statuses = {
        t.number: (t.state.name, t.user_attrs.get("message"), run_id and tracker.status(run_id))
        for t in trials
        for run_id in [t.user_attrs.get("mlflow_run_id")]
    }
    said = f"trials (state, message, MLflow status): {statuses}\nvictims: {[v.number for v in victims]}\n{said}"
    assert not [t for t in trials if t.state == TrialState.RUNNING], said  # every running trial went back to the queue
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert {v.number for v in victims} <= {t.number for t in stopped}, said
    assert all("interrupted" in t.user_attrs["message"] for t in stopped), said
    # a trial stopped in training has its runs KILLED (one stopped before its run began has none)
    assert all(tracker.status(v.user_attrs["mlflow_run_id"]) == "KILLED" for v in victims), said
    assert all(
        tracker.status(t.user_attrs["mlflow_run_id"]) != "RUNNING" for t in stopped if t.user_attrs.get("mlflow_run_id")
    ), said

    with _launcher("--study", "stop", "--devices", "cpu:2") as second:
        out, err = _finish(second, timeout=150)
    said = f"second launcher's output:\n{out}\n{err}"
    assert second.returncode == 0, said
    assert "study stop is complete" in out, said
    complete = _study(registry, "stop").get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["strategy"] for t in complete) == ["constant:0", "heuristic"], said
    assert tracker.status(study.user_attrs["mlflow_sweep_run_id"]) == "FINISHED", said


@pytest.mark.integration
def test_workers_do_not_outlive_a_killed_launcher(synthetic, registry):
    """SIGKILL reaches no handler: the kernel stops the workers (Linux's parent-death signal)."""
    workers: list[int] = []
    try:
        with _launcher("--study", "orphan", "--strategies", "constant:0,heuristic", *TINY, "--devices", "cpu:2") as it:
            deadline = time.time() + 90
            while len(workers := _worker_pids(it.pid)) < 2:
                assert it.poll() is None, it.communicate()
                assert time.time() < deadline, "the workers did not start in 90 s"
                time.sleep(0.2)
            it.send_signal(signal.SIGKILL)
            it.communicate(timeout=10)
        deadline = time.time() + 60
        while not all(_gone(pid) for pid in workers):
            assert time.time() < deadline, "a worker outlived its launcher by 60 s"
            time.sleep(0.2)
    finally:
        for pid in workers:  # each leads its own group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "gpus, devices, message",
    [
        (0, "gpu", "'gpu' is not a device"),
        (0, "cuda:0,,cuda:1", "is malformed"),
        (0, "", "is malformed"),
        (0, "cpu:0", "must be >= 1"),
        (0, "cpu:two", "cpu or cpu:N"),
        (0, "cpu,cuda:0", "cpu or cpu:N"),
        (0, "cuda:0", "CUDA is not available on this machine"),
        (0, "cuda", "CUDA is not available on this machine"),
        (2, "cuda:3", "cuda:3 does not exist; this machine has 2 CUDA devices (cuda:0, cuda:1)"),
        (2, "cuda:0,cuda:0", "cuda:0 is listed twice"),
        (2, "cuda,cuda:1", "cannot be combined"),
    ],
)
def test_bad_devices_are_refused_before_any_study(run_cli, synthetic, registry, monkeypatch, gpus, devices, message):
    from dmgl_cli.sweep import launcher

    monkeypatch.setattr(launcher, "cuda_device_count", lambda: gpus)
    result = run_cli("sweep", "--study", "bad", "--strategies", "lb", "--devices", devices, expect=1)
    assert message in result.output and result.output.count("Error:") == 1
    assert "bad" not in optuna.get_all_study_names(_storage(registry))


def test_devices_and_create_only_conflict(run_cli, synthetic, registry):
    result = run_cli("sweep", "--strategies", "lb", "--devices", "cpu:2", "--create-only", expect=1)
    assert "--devices starts workers and --create-only starts none" in result.output


def test_device_lists_and_thread_split():
    from dmgl_cli.sweep.launcher import Slot, parse_devices, worker_threads

    assert parse_devices("cpu") == [Slot("cpu", "cpu")]
    assert parse_devices(" cpu:3 ") == [Slot("cpu#0", "cpu"), Slot("cpu#1", "cpu"), Slot("cpu#2", "cpu")]
    assert parse_devices("cuda", cuda_count=2) == [Slot("cuda:0", "cuda:0"), Slot("cuda:1", "cuda:1")]
    assert parse_devices("cuda:1, cuda:0", cuda_count=2) == [Slot("cuda:1", "cuda:1"), Slot("cuda:0", "cuda:0")]
    assert worker_threads(2, cores=16) == 8 and worker_threads(3, cores=2) == 1 and worker_threads(1, cores=4) == 4
