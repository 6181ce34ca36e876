"""Start-up and exit of ``dmgl train`` on the built-in synthetic recipe, optionally against another source tree.

Each run is ``python -m dmgl_cli train --set train.epochs=E`` in a fresh process with its stderr on a
pseudo-terminal, so that it draws its progress bar: the bar's first drawing marks the end of the first training
step, its last drawing the end of the last step (as ``whole_run.py`` reads them). Per run: start-up (process start
-> end of the first step), exit (end of the last step -> process gone: the last epoch's scoring, the Shapley values,
the logged model, the summaries, the exit) and the whole command. ``--against PATH`` alternates with a checkout of
another commit (``git worktree add PATH COMMIT``), run with ``PYTHONPATH=PATH`` from the same virtual environment,
so that before and after share the machine's state; medians and ranges are printed per tree.

``--floors`` also times, alternating with them, two scripts that do only what no torch training run avoids:
importing torch and taking one ``torch.optim.SGD`` step on a two-layer MLP of the synthetic recipe's size (the
step imports ``torch._dynamo``: ``Optimizer.step`` is wrapped in ``_use_grad_for_differentiable``, which imports it
on every call), and the same after importing MLflow and opening the registry's SQLite store with ``MlflowClient``
(no run created). They print a line after the step; process start -> that line is their start-up.

    python bench/startup.py                                   # this tree, 3 runs
    python bench/startup.py --floors                          # and what a bare torch step costs, with and without MLflow
    git worktree add /tmp/before HEAD~1 && python bench/startup.py --against /tmp/before --repeats 4
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from whole_run import StreamClock  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TARGET_S = 3.0
EXIT_TARGET_S = 3.0


def one_run(tree: Path, epochs: int, timeout: float) -> dict[str, float]:
    """One ``dmgl train`` of the synthetic recipe from the source tree ``tree``: its start-up, exit and whole."""
    command = [sys.executable, "-m", "dmgl_cli", "train", "--json", "--set", f"train.epochs={epochs}"]
    env = dict(os.environ, PYTHONPATH=str(tree), TERM="xterm", MLFLOW_DISABLE_TELEMETRY="true")
    controller, terminal = pty.openpty()
    # a terminal of 0 columns (a new pseudo-terminal's size) would have tqdm draw nothing
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    started = time.time()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=terminal, env=env, cwd=tree, start_new_session=True
    )
    os.close(terminal)
    clock = StreamClock(controller)
    ended = waited(process, timeout, f"dmgl train from {tree}")
    clock.join(5.0)
    os.close(controller)
    first, last = clock.first(b"epoch 1"), clock.last_bar_time(f"epoch {epochs}".encode())
    if process.returncode != 0 or first is None or last is None:
        raise SystemExit(f"dmgl train from {tree} failed (exit {process.returncode}):\n{clock.text()[-2000:]}")
    return {"startup": first - started, "exit": ended - last, "whole": ended - started}


# What every torch training run pays before its first step, whatever drives it (see the module's docstring).
FLOOR_STEP = """
import time, torch
torch.set_num_threads(2)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
loss = torch.nn.functional.cross_entropy(model(torch.randn(32, 64)), torch.randint(0, 4, (32,)))
loss.backward()
optimiser.step()
print("first step done", flush=True)
"""
FLOOR_MLFLOW = """
import os
from mlflow.tracking import MlflowClient
MlflowClient(tracking_uri="sqlite:///" + os.path.join(os.environ["DMGL_HOME"], "mlflow.db")).search_experiments(
    max_results=1
)
"""
FLOORS = {"floor: torch + one SGD step": FLOOR_STEP, "floor: + MLflow store opened": FLOOR_MLFLOW + FLOOR_STEP}


def floor_run(name: str, timeout: float) -> dict[str, float]:
    """One floor script (:data:`FLOORS`) in a fresh process: process start -> its line after the step, and whole."""
    reading, writing = os.pipe()  # read by the clock alone, so that each chunk keeps the time it arrived
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, "-c", FLOORS[name]],
        stdout=writing,
        env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"),
        start_new_session=True,
    )
    os.close(writing)
    clock = StreamClock(reading)
    ended = waited(process, timeout, name)
    clock.join(5.0)
    os.close(reading)
    stepped = clock.first(b"first step done")
    if process.returncode != 0 or stepped is None:
        raise SystemExit(f"{name} failed (exit {process.returncode})")
    return {"startup": stepped - started, "exit": ended - stepped, "whole": ended - started}


def waited(process: subprocess.Popen, timeout: float, what: str) -> float:
    """The time ``process`` ended; past ``timeout`` seconds its process group is killed and the bench stops."""
    try:
        process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        raise SystemExit(f"{what} ran past --timeout {timeout} s") from None
    return time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another source tree to alternate with (a git worktree)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tree")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--floors", action="store_true", help="also time a bare torch step, with and without MLflow")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    args = parser.parse_args()
    home = common.use_private_registry()
    subprocess.run(
        [sys.executable, "-m", "dmgl_cli", "prepare", "synthetic", "--silent"],
        check=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    print(f"startup: {common.machine_line()}, registry {home}", flush=True)
    trees = [ROOT] + ([args.against.resolve()] if args.against else [])
    variants: list[Path | str] = [*trees, *(FLOORS if args.floors else ())]
    measured: dict[Path | str, list[dict[str, float]]] = {variant: [] for variant in variants}
    for round_number in range(args.repeats):
        for variant in variants:
            load = os.getloadavg()[0]
            if isinstance(variant, Path):
                got = one_run(variant, args.epochs, args.timeout)
            else:
                got = floor_run(variant, args.timeout)
            measured[variant].append(got)
            print(
                f"  [round {round_number + 1}/{args.repeats}] {variant}: start-up {got['startup']:.2f} s, exit "
                f"{got['exit']:.2f} s, whole {got['whole']:.2f} s (load average {load:.1f} at its start)",
                flush=True,
            )
    rows = []
    for variant, found in measured.items():
        row = [str(variant)]
        for key in ("startup", "exit", "whole"):
            values = [f[key] for f in found]
            row.append(f"{common.median(values):.2f} {common.spread(values)}")
        startup = common.median([f["startup"] for f in found])
        leaving = common.median([f["exit"] for f in found])
        row.append(
            f"start-up <= {STARTUP_TARGET_S:g} s {common.verdict(startup, STARTUP_TARGET_S, True)}, exit <= "
            f"{EXIT_TARGET_S:g} s {common.verdict(leaving, EXIT_TARGET_S, True)}"
        )
        rows.append(row)
    common.print_table(
        ["tree or floor", "start-up s", "exit s", "whole s", "targets"],
        rows,
        f"dmgl train, synthetic recipe, {args.epochs} epochs (medians [range] over {args.repeats} runs per tree)",
    )


if __name__ == "__main__":
    main()
