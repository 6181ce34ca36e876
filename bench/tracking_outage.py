"""What a tracking-server outage costs a ``dmgl train`` (issue #25): an undisturbed run against a run whose
``mlflow server`` is stopped for ``--outage-s`` seconds (from the end of epoch 2) and started again, both on a real
server (tests/mlflow_server.py) with a synthetic dataset in a private registry; and how long an unreachable server
takes to be refused.

Printed: each run's time to its last epoch line (training) and to its exit (training + sending what waited), the
ratio of the trainings, the (metric, step) records lost and duplicated against the undisturbed run, and the
refusal times (the probe alone, and whole ``dmgl`` commands, Python's start-up included).

    .venv/bin/python bench/tracking_outage.py                     # the issue's 10-minute outage
    .venv/bin/python bench/tracking_outage.py --outage-s 60 --epochs 20
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mlflow_server import TrackingServer, free_port  # noqa: E402


def _dmgl(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dmgl_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


class Timed:
    """A ``dmgl train`` whose output lines are stamped with the seconds since it started."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.started = time.monotonic()
        self.process = _dmgl("train", *args, env=env)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic() - self.started, line))

    def wait_for(self, pattern: str, timeout: float = 3600) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.1)
        raise SystemExit(f"no line matching {pattern!r}:\n{''.join(line for _, line in self.lines)[-3000:]}")

    def finish(self, timeout: float = 7200) -> tuple[float, float]:
        """(seconds to the last epoch line, seconds to exit)."""
        self.process.wait(timeout=timeout)
        ended = time.monotonic() - self.started
        self.reader.join(timeout=30)
        if self.process.returncode != 0:
            raise SystemExit("".join(line for _, line in self.lines)[-3000:])
        trained = max(at for at, line in self.lines if re.search(r"epoch +\d+/\d+", line))
        return trained, ended


def _steps(uri: str, parent_id: str) -> dict[str, list[int]]:
    from dmgl_cli.tracking import Tracker, dmgl_metric_name

    tracker = Tracker(uri)
    (seed,) = tracker.children(parent_id)
    return {
        dmgl_metric_name(name): sorted(m.step for m in tracker.client.get_metric_history(seed.run_id, name))
        for name in tracker.client.get_run(seed.run_id).data.metrics
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=600.0, help="seconds the server is stopped (default 600)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=600)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="dmgl-bench-outage-"))
    env = {
        **os.environ,
        "DMGL_HOME": str(home / "registry"),
        "OMP_NUM_THREADS": "1",
        "DMGL_TRACKING_DRAIN_S": str(args.outage_s + 600),  # the bench waits for everything to be sent
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    os.environ.update({k: env[k] for k in ("DMGL_HOME",)})
    server = TrackingServer(home / "server")
    try:
        prepare = _dmgl("prepare", "synthetic", "-o", f"samples={args.samples}", "--silent", env=env)
        prepare.communicate(timeout=600)
        server.start()
        settings = ["--tracking-uri", server.url, "--set", f"train.epochs={args.epochs}"]
        settings += ["--set", f"train.batch_size={args.batch_size}"]

        undisturbed = Timed([*settings, "--name", "undisturbed"], env)
        undisturbed_id = undisturbed.wait_for(r"parent run ([0-9a-f]{32})").group(1)
        base_trained, base_ended = undisturbed.finish()

        disturbed = Timed([*settings, "--name", "disturbed"], env)
        disturbed_id = disturbed.wait_for(r"parent run ([0-9a-f]{32})").group(1)
        disturbed.wait_for(rf"epoch +2/{args.epochs}")
        server.stop()
        stopped = time.monotonic()
        while time.monotonic() - stopped < args.outage_s and disturbed.process.poll() is None:
            time.sleep(0.5)
        remaining = args.outage_s - (time.monotonic() - stopped)
        if remaining > 0:  # training ended first: the process waits, sending nothing, until the server is back
            time.sleep(remaining)
        outage = time.monotonic() - stopped
        server.start()
        back = time.monotonic() - disturbed.started
        trained, ended = disturbed.finish()

        expected, got = _steps(server.url, undisturbed_id), _steps(server.url, disturbed_id)
        pairs = {(k, s) for k, steps in expected.items() for s in steps}
        logged = [(k, s) for k, steps in got.items() for s in steps]
        lost = len(pairs - set(logged))
        duplicated = len(logged) - len(set(logged))
    finally:
        server.stop()

    from dmgl_cli.tracking.store import server_unreachable

    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    reason = server_unreachable(dead)
    probe = time.monotonic() - started
    refusals = {}
    for command in (["runs", "list"], ["train", "--set", "train.epochs=1"]):
        started = time.monotonic()
        refused = _dmgl(*command, "--tracking-uri", dead, env=env)
        output, _ = refused.communicate(timeout=120)
        refusals[" ".join(command[:2])] = (time.monotonic() - started, refused.returncode, output.strip())
    shutil.rmtree(home, ignore_errors=True)

    print(f"synthetic, {args.epochs} epochs, batch {args.batch_size}; server stopped after epoch 2 for {outage:.0f} s")
    print(f"{'run':<12} {'training s':>11} {'to exit s':>10}")
    print(f"{'undisturbed':<12} {base_trained:>11.1f} {base_ended:>10.1f}")
    print(f"{'outage':<12} {trained:>11.1f} {ended:>10.1f}   (server back at {back:.1f} s)")
    print(f"training time, outage / undisturbed: {trained / base_trained:.3f}")
    print(f"(metric, step) records: {len(pairs)} expected, {lost} lost, {duplicated} duplicated")
    print(f"refusing an unreachable server: probe {probe:.2f} s ({reason})")
    for name, (seconds, code, output) in refusals.items():
        print(f"  dmgl {name}: {seconds:.2f} s in all (Python start-up included), exit {code}: {output}")


if __name__ == "__main__":
    main()
