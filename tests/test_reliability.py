"""Crashes for real: SIGKILL, SIGTERM and Ctrl-C on training processes, killed checkpoint writers, stale runs."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmgl_cli.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint
from dmgl_cli.config import load_config
from dmgl_cli.errors import DmglError, Interrupted
from dmgl_cli.imbalance import MACHINE_MEASURED
from dmgl_cli.run import training
from dmgl_cli.tracking import Tracker, local_path, mlflow_metric_name

# measured on the machine, not computed from the data: they differ between any two runs
TIMING_KEYS = {"train_samples_per_s", "epoch_seconds", *(f"final_{key}" for key in MACHINE_MEASURED)}
# Long enough (many small batches) that a signal sent after epoch 1-3 lands well before the end.
SETTINGS = ["train.epochs=10", "train.batch_size=16", "strategy.name=lb", "strategy.lb.update_every=7"]


def _start_training(*extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "dmgl_cli", "train", "--name", "victim"]
    for setting in SETTINGS:
        args += ["--set", setting]
    return subprocess.Popen([*args, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _child_of(process: subprocess.Popen) -> tuple[str, Path]:
    """The parent run id the process announces, then its seed run's checkpoint folder."""
    line = process.stdout.readline()
    parent_id = re.search(r"parent run ([0-9a-f]{32})", line).group(1)
    tracker = Tracker()
    deadline = time.time() + 60
    while time.time() < deadline:
        children = tracker.children(parent_id)
        if children:
            return parent_id, local_path(children[0].artifact_uri) / "checkpoints"
        time.sleep(0.05)
    raise AssertionError("the training process never started its seed run")


def _wait_for_epoch(folder: Path, epoch: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        path = folder / "last.pt"
        if path.exists() and load_checkpoint(path)["epoch"] >= epoch:
            return
        assert process.poll() is None, "training finished before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint for epoch {epoch}")


def _histories(tracker: Tracker, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = tracker.get_run(run_id)
    out = {}
    for key in run.metrics:
        if key in TIMING_KEYS:
            continue
        history = [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, mlflow_metric_name(key))]
        steps = [step for step, _ in history]
        assert len(steps) == len(set(steps)), f"{key} logged twice at one step"
        out[key] = sorted(history)
    return out


@pytest.fixture
def reference(synthetic):
    """The uninterrupted run of the same seed, recorded in-process."""
    outcome = training.train(load_config("synthetic", SETTINGS), [0], tracker=Tracker(), run_name="reference")
    return outcome.seeds[0].run_id


def _assert_same_as_reference(tracker: Tracker, run_id: str, reference: str) -> float:
    resumed, uninterrupted = _histories(tracker, run_id), _histories(tracker, reference)
    assert set(resumed) == set(uninterrupted)
    worst = 0.0
    for key, history in uninterrupted.items():
        assert [s for s, _ in resumed[key]] == [s for s, _ in history], key
        worst = max([worst] + [abs(a - b) for (_, a), (_, b) in zip(resumed[key], history, strict=True)])
    assert worst == 0.0
    return worst


@pytest.mark.integration
def test_sigkill_then_resume_is_exact(run_cli, reference):
    kill_after = random.Random().randint(1, 4)
    process = _start_training()
    parent_id, folder = _child_of(process)
    _wait_for_epoch(folder, kill_after, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    tracker = Tracker()
    child = tracker.children(parent_id)[0]
    assert child.status == "RUNNING"  # SIGKILL leaves no chance to say otherwise
    # The next command that touches the experiment reports it; reconcile settles it.
    run_cli("train", "--epochs", "1", "--strategy", "heuristic")
    settled = run_cli("runs", "reconcile")
    assert child.run_id in settled.output and parent_id in settled.output
    assert tracker.get_run(child.run_id).status == "KILLED"
    run_cli("train", "--resume", parent_id)
    assert tracker.get_run(child.run_id).status == "FINISHED"
    _assert_same_as_reference(tracker, child.run_id, reference)


@pytest.mark.integration
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_checkpoint_mid_epoch_and_resume_exactly(run_cli, reference, stop_signal):
    process = _start_training()
    parent_id, folder = _child_of(process)
    _wait_for_epoch(folder, random.Random().randint(1, 3), process)
    time.sleep(random.Random().uniform(0.0, 0.1))  # land somewhere inside the next epoch
    process.send_signal(stop_signal)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "Traceback" not in output and "checkpointed and marked KILLED" in output
    tracker = Tracker()
    child = tracker.children(parent_id)[0]
    assert child.status == "KILLED" and tracker.get_run(parent_id).status == "KILLED"
    run_cli("train", "--resume", child.run_id)
    assert tracker.get_run(child.run_id).status == "FINISHED"
    assert tracker.get_run(parent_id).status == "FINISHED"
    _assert_same_as_reference(tracker, child.run_id, reference)


def test_an_exception_marks_the_runs_failed(run_cli, synthetic):
    config = load_config("synthetic", ["train.epochs=2"])

    def explode(seed, epoch, total, metrics):
        raise RuntimeError("boom")

    parents = []
    with pytest.raises(RuntimeError):
        training.train(config, [0], tracker=Tracker(), progress=explode, on_parent=parents.append)
    tracker = Tracker()
    assert tracker.get_run(parents[0]).status == "FAILED"
    assert tracker.children(parents[0])[0].status == "FAILED"


@pytest.mark.parametrize("where", ["parent's params", "seed's creation"])
def test_a_stop_between_a_runs_creation_and_its_training_leaves_no_run_running(synthetic, monkeypatch, where):
    """Ctrl-C can land while a run is being recorded, before any training (a sweep worker's trial did): the runs
    already made end KILLED, never RUNNING, and the stop propagates."""
    config = load_config("synthetic", ["train.epochs=2"])
    parents: list[str] = []
    if where == "parent's params":

        def on_parent(parent_id):
            parents.append(parent_id)
            raise KeyboardInterrupt

    else:
        on_parent = parents.append

        def stopped_before_training(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(training, "train_seed", stopped_before_training)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, [0, 1], tracker=Tracker(), on_parent=on_parent)
    tracker = Tracker()
    assert tracker.get_run(parents[0]).status == "KILLED"
    children = tracker.children(parents[0])
    assert len(children) == (0 if where == "parent's params" else 1)
    assert all(child.status == "KILLED" for child in children)


WRITER = """
import sys, torch
from dmgl_cli.checkpoint import save_checkpoint
path, n = sys.argv[1], 0
print("ready", flush=True)
while True:
    n += 1
    save_checkpoint(path, {"n": n, "weights": torch.full((200_000,), float(n))})
"""


@pytest.mark.integration
def test_killed_checkpoint_writers_never_leave_a_corrupt_checkpoint(tmp_path):
    target = tmp_path / "ckpt" / "last.pt"
    rng = random.Random()
    crashes = 0
    for _ in range(25):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.25))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        crashes += 1
        if target.exists():
            state = load_checkpoint(target)  # raises on a torn file
            assert torch.all(state["weights"] == float(state["n"]))
    assert crashes == 25 and target.exists()
    # Leftover temporary files from the crashes are removed by the next save into the folder.
    save_checkpoint(target, {"n": 0})
    assert [p.name for p in target.parent.iterdir()] == ["last.pt"]


def test_the_background_writer_writes_the_state_as_it_was_when_saved(tmp_path):
    shared = torch.nn.Parameter(torch.ones(4))
    module = torch.nn.Module()
    module.first, module.second = shared, shared  # tied: two names, one tensor
    state = {"model": module.state_dict(), "history": [{"epoch": 1.0}], "sizes": (1, torch.zeros(2))}
    writer = CheckpointWriter()
    target = tmp_path / "last.pt"
    writer.submit(lambda snapshot: save_checkpoint(target, snapshot), state, "last.pt")
    with torch.no_grad():
        shared.add_(1.0)  # training goes on while the write is in flight
    state["history"][0]["epoch"] = 2.0
    writer.wait()
    saved = load_checkpoint(target)
    assert torch.equal(saved["model"]["first"], torch.ones(4)) and saved["history"] == [{"epoch": 1.0}]
    assert saved["model"]["first"].data_ptr() == saved["model"]["second"].data_ptr()  # still one tensor
    assert hasattr(saved["model"], "_metadata")  # what load_state_dict reads for versioned modules
    # the next snapshot is copied into the memory of the one written: the file written before is untouched
    writer.submit(lambda snapshot: save_checkpoint(tmp_path / "next.pt", snapshot), state, "next.pt")
    writer.release()
    assert torch.equal(load_checkpoint(tmp_path / "next.pt")["model"]["first"], torch.full((4,), 2.0))
    assert torch.equal(load_checkpoint(target)["model"]["first"], torch.ones(4))


def test_background_writes_never_overlap_and_a_failure_is_one_message(tmp_path):
    writer = CheckpointWriter()
    spans: list[tuple[float, float]] = []

    def slow(snapshot):
        started = time.perf_counter()
        time.sleep(0.1)
        spans.append((started, time.perf_counter()))

    for _ in range(3):
        writer.submit(slow, {"n": 1}, "slow")
    writer.wait()
    assert len(spans) == 3
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False))

    def full(snapshot):
        raise OSError(28, "No space left on device")

    writer.submit(full, {"n": 1}, "checkpoint checkpoints/last.pt of run r")
    with pytest.raises(DmglError, match="cannot write checkpoint checkpoints/last.pt of run r .*No space left"):
        writer.wait()
    writer.wait()  # reported once


def test_a_stopped_run_has_its_checkpoint_on_disk_before_it_is_marked_killed(registry, monkeypatch):
    import dmgl_cli.checkpoint

    written = dmgl_cli.checkpoint.save_checkpoint

    def slow_save(path, state):
        time.sleep(0.3)
        written(path, state)

    monkeypatch.setattr(dmgl_cli.checkpoint, "save_checkpoint", slow_save)
    tracker = Tracker()
    run_id = tracker.start_run(tracker.experiment_id("writer"), "victim", {})
    with pytest.raises(Interrupted):
        with tracker.run(run_id):
            tracker.save_checkpoint(run_id, "last", {"kind": "last", "n": 7})
            raise Interrupted()
    assert load_checkpoint(local_path(tracker.get_run(run_id).artifact_uri) / "checkpoints" / "last.pt")["n"] == 7
    assert tracker.get_run(run_id).status == "KILLED"


@pytest.mark.slow
def test_deterministic_runs_give_bit_identical_weights(run_cli, synthetic):
    outputs = [run_cli("train", "--deterministic", "--epochs", "2", "--strategy", "lb").output for _ in range(2)]
    tracker = Tracker()
    weights = []
    for output in outputs:
        parent_id = re.search(r"parent run ([0-9a-f]{32})", output).group(1)
        child = tracker.children(parent_id)[0]
        assert child.params["train.deterministic"] == "True"
        assert child.tags["dmgl.torch"] == torch.__version__ and "dmgl.cuda" in child.tags
        weights.append(
            torch.load(local_path(child.artifact_uri) / "checkpoints" / "last.pt", weights_only=True)["model"]
        )
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    torch.use_deterministic_algorithms(False)


@pytest.mark.integration
def test_concurrent_trainings_on_one_sqlite_store_lose_nothing(registry, tmp_path):
    # A store nobody created yet: the processes race to create its tables and the experiment, then write at once.
    subprocess.run(
        [sys.executable, "-m", "dmgl_cli", "prepare", "synthetic", "-o", "samples=400", "--silent"],
        check=True,
        capture_output=True,
    )
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dmgl_cli",
                "train",
                "--strategy",
                "heuristic",
                "--epochs",
                "3",
                "--seeds",
                "2",
                "--silent",
                "--name",
                f"writer{i}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        assert "locked" not in output and "Traceback" not in output
    tracker = Tracker()
    parents = [re.search(r"parent run ([0-9a-f]{32})", o).group(1) for o in outputs]
    written = 0
    for parent_id in parents:
        assert tracker.get_run(parent_id).status == "FINISHED"
        for child in tracker.children(parent_id):
            histories = _histories(tracker, child.run_id)
            for key in ("alpha", "train_loss", "val_acc", "test_acc_slow", "val_modality_gap"):
                assert [step for step, _ in histories[key]] == [1, 2, 3], key
            written += sum(len(h) for h in histories.values())
    assert written > 3 * 2 * 3 * 40  # every process, seed and epoch wrote its few dozen metrics
