"""A tracking server that goes away costs no training: a real ``mlflow server`` stopped and started again in the
middle of a ``dmgl train``, a training process killed during an outage (its journal sent by ``dmgl runs sync``),
and an unreachable server refused before anything trains."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from mlflow_server import TrackingServer, free_port
from processes import finish

from dmgl_cli.tracking import Tracker, dmgl_metric_name

SETTINGS = ["--set", "train.epochs=8", "--set", "train.batch_size=8"]
SEED_ARTIFACTS = {"config.yaml", "final_metrics.json", "alpha.csv", "alpha.png", "checkpoints/best.pt"}


class Training:
    """A ``dmgl train`` subprocess in its own process group, its output read line by line as it comes."""

    def __init__(self, *args: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DMGL_TRACKING_DRAIN_S": "300"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dmgl_cli", "train", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            assert self.process.poll() is None or self._reader.is_alive(), "".join(self.lines)[-3000:]
            time.sleep(0.1)
        os.killpg(self.process.pid, signal.SIGKILL)
        raise AssertionError(f"no line matching {pattern!r} in {timeout}s:\n{''.join(self.lines)[-3000:]}")

    def finish(self, timeout: float = 600) -> str:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"dmgl train did not finish in {timeout}s:\n{''.join(self.lines)[-3000:]}") from None
        self._reader.join(timeout=30)
        output = "".join(self.lines)
        assert self.process.returncode == 0, output[-3000:]
        return output

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def server(registry, tmp_path):
    tracking = TrackingServer(tmp_path / "server")
    tracking.start()
    yield tracking
    tracking.stop()


def _histories(tracker: Tracker, run_id: str) -> dict[str, list[int]]:
    """{dmgl metric key: the steps it was logged at, in order, repeats kept}."""
    names = tracker.client.get_run(run_id).data.metrics
    return {
        dmgl_metric_name(name): sorted(m.step for m in tracker.client.get_metric_history(run_id, name))
        for name in names
    }


def _artifacts(tracker: Tracker, run_id: str, folder: str | None = None) -> set[str]:
    found = set()
    for entry in tracker.client.list_artifacts(run_id, folder):
        found |= _artifacts(tracker, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def _seed_of(tracker: Tracker, parent_id: str):
    (seed,) = tracker.children(parent_id)
    return seed


@pytest.mark.integration
@pytest.mark.slow
def test_a_server_stopped_mid_run_loses_and_duplicates_nothing(synthetic, server, registry):
    reference = Training("--tracking-uri", server.url, "--name", "undisturbed", *SETTINGS)
    reference_id = reference.wait_for(r"parent run ([0-9a-f]{32})").group(1)
    reference.finish()

    victim = Training("--tracking-uri", server.url, "--name", "disturbed", *SETTINGS)
    parent_id = victim.wait_for(r"parent run ([0-9a-f]{32})").group(1)
    victim.wait_for(r"epoch +2/8")
    server.stop()
    victim.wait_for(r"epoch +5/8")  # three epochs trained while the server is away: nothing waited for it
    server.start()
    output = victim.finish()
    assert "wait in the journal" not in output

    tracker = Tracker(server.url)
    seed, undisturbed = _seed_of(tracker, parent_id), _seed_of(tracker, reference_id)
    histories, expected = _histories(tracker, seed.run_id), _histories(tracker, undisturbed.run_id)
    assert histories == expected  # every key, each step once, as in the undisturbed run
    assert histories["val_acc"] == list(range(1, 9))
    assert seed.params == undisturbed.params and seed.params
    assert tracker.get_run(parent_id).params == tracker.get_run(reference_id).params
    parent = tracker.get_run(parent_id)
    assert seed.status == parent.status == "FINISHED"
    assert {"dmgl.role", "dmgl.dataset", "dmgl.heartbeat", "dmgl.peak_memory"} <= set(seed.tags)
    assert {"dmgl.role", "dmgl.seeds"} <= set(parent.tags)
    assert "mean ± std" in parent.tags["mlflow.note.content"]  # the description, written at the end
    assert SEED_ARTIFACTS | {"checkpoints/last.pt"} <= _artifacts(tracker, seed.run_id)
    assert {"config.yaml", "final_metrics.json", "alpha.png"} <= _artifacts(tracker, parent_id)
    assert tracker.logged_model_id(seed.run_id) is not None
    assert tracker.client.get_run(seed.run_id).inputs.dataset_inputs
    assert not list((registry / "journal").glob("*/*/records.jsonl"))  # everything sent, journals removed


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("then", ["runs sync", "train --resume"])
def test_a_process_killed_during_an_outage_leaves_a_journal_that_is_sent_once(
    synthetic, server, registry, run_cli, then
):
    victim = Training("--tracking-uri", server.url, *SETTINGS)
    parent_id = victim.wait_for(r"parent run ([0-9a-f]{32})").group(1)
    victim.wait_for(r"epoch +2/8")
    server.stop()
    victim.wait_for(r"epoch +4/8")
    victim.kill()
    journals = list((registry / "journal").glob("*/*/records.jsonl"))
    assert journals, "the killed process left no journal"

    server.start()
    if then == "runs sync":
        result = run_cli("runs", "sync", "--tracking-uri", server.url)
        sent = re.search(r"sent (\d+) record\(s\) of (\d+) run\(s\)", result.output)
        assert sent and int(sent.group(1)) > 0, result.output
        assert "no journal" in run_cli("runs", "sync", "--tracking-uri", server.url).output  # sent once, then gone
    else:  # the resume sends the run's journals first, then trains the rest from the last checkpoint
        Training("--resume", parent_id, "--tracking-uri", server.url).finish()

    tracker = Tracker(server.url)
    seed = _seed_of(tracker, parent_id)
    histories = _histories(tracker, seed.run_id)
    for key, steps in histories.items():
        assert len(steps) == len(set(steps)), f"{key} logged twice at one step: {steps}"
    # the epochs the process printed before it was killed (during the outage) are in the store
    assert histories["val_acc"][:4] == [1, 2, 3, 4]
    if then == "train --resume":
        assert histories["val_acc"] == list(range(1, 9))
        assert seed.status == tracker.get_run(parent_id).status == "FINISHED"
    assert {"config.yaml"} <= _artifacts(tracker, seed.run_id)
    assert not list((registry / "journal").glob("*/*/records.jsonl"))


def test_an_unreachable_tracking_server_is_refused_in_one_line(synthetic, run_cli):
    uri = f"http://127.0.0.1:{free_port()}"
    for command in (["train", *SETTINGS], ["runs", "list"], ["runs", "sync"]):
        result = run_cli(*command, "--tracking-uri", uri, expect=1)
        message = result.output.strip()
        assert "\n" not in message, message
        assert uri in message and "does not answer" in message, message


def test_runs_sync_refuses_a_local_store(run_cli):
    result = run_cli("runs", "sync", expect=1)
    assert "local store" in result.output and "keeps no journal" in result.output


# A process that logs three epochs, sees them sent, then dies as if between sending records and moving its cursor:
# the cursor is put back to the first record, and the process ends without its end-of-command send (os._exit).
_DIES_AFTER_SENDING = """
import os, sys
from pathlib import Path
from dmgl_cli.tracking import Tracker
tracker = Tracker(sys.argv[1])
run_id = tracker.start_run(tracker.experiment_id("journal"), "journal-run", {"dmgl.role": "seed"})
for step in (1, 2, 3):
    tracker.log_metrics(run_id, {"val_acc": step / 10}, step)
tracker.set_tags(run_id, {"dmgl.note": "sent twice"})
tracker.flush(run_id)
folder = tracker._journal.run_folder(run_id)
first = (folder / "records.jsonl").read_bytes().splitlines(keepends=True)[0]
(folder / "sent").write_text(str(len(first)))
print(run_id, flush=True)
os._exit(0)
"""


@pytest.mark.integration
def test_a_journal_left_by_a_dead_process_is_sent_by_the_next_reader_each_step_once(registry, tmp_path):
    server = TrackingServer(tmp_path / "server")
    server.start()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _DIES_AFTER_SENDING, server.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        out, err = finish(process, 300, "the process that dies after sending")
        run_id = out.split()[-1]
        assert list((registry / "journal" / run_id).glob("*/records.jsonl")), err
        tracker = Tracker(server.url)
        # the read takes the journal over and sends records 2-4 again: the metric steps are already there
        assert tracker.metric_history(run_id, "val_acc") == [(1, 0.1), (2, 0.2), (3, 0.3)]
        steps = [m.step for m in tracker.client.get_metric_history(run_id, "val/acc")]
        assert sorted(steps) == [1, 2, 3]
        assert tracker.get_run(run_id).tags["dmgl.note"] == "sent twice"
        assert tracker.close() == 0
        assert not list((registry / "journal").glob("*/*/records.jsonl"))
    finally:
        server.stop()
