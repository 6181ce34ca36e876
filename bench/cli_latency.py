"""How long the commands that train nothing take to answer, on a generated MLflow store of N runs.

The store is written through dmgl's own tracking module (``Tracker``): N runs in all, as ``dmgl train`` lays them
out (a parent with two seed runs under it, tags ``dmgl.*``, the settings as params, ``final_*`` metrics), in a
temporary registry (``--home`` keeps it, and a store already there is reused). Each command then runs as a user
runs it, ``python -m dmgl_cli ...`` in a fresh process, ``--repeats`` times in turn (A B C A B C ...), and the
median, least and greatest wall seconds are printed, with the heavy packages the command imported (read from one
more run under ``python -X importtime``). ``python -c pass`` and ``dmgl --help`` are the floor.

    python bench/cli_latency.py                  # 200 runs, 3 repeats
    python bench/cli_latency.py --runs 1000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HEAVY = ("torch", "mlflow", "optuna")


def generate_store(runs: int) -> tuple[str, str]:
    """``runs`` runs in the registry of $DMGL_HOME: parents of two seeds each; returns two parents' ids."""
    from dmgl_cli.tracking import Tracker

    tracker = Tracker()
    experiment_id = tracker.experiment_id("latency")
    parents = max(1, runs // 3)  # each with two seeds
    existing = tracker.search([experiment_id], "tags.`dmgl.role` = 'parent'", max_results=1)
    if existing and len(tracker.search([experiment_id])) >= 3 * parents:
        found = tracker.search([experiment_id], "tags.`dmgl.role` = 'parent'", max_results=2)
        return found[0].run_id, found[-1].run_id
    strategies = [("constant", {"strategy.alpha": 0.5}), ("stepwise", {"strategy.p": 0.95}), ("lb", {})]
    started, parent_id, first_parent = time.monotonic(), "", ""
    for index in range(parents):
        strategy, setting = strategies[index % len(strategies)]
        tags = {"dmgl.dataset": "synthetic", "dmgl.method": "concat", "dmgl.strategy": strategy}
        params = {"strategy.name": strategy, "method.name": "concat", "train.select_metric": "acc", **setting}
        parent_id = tracker.start_run(
            experiment_id, f"concat-{strategy}-{index}", {**tags, "dmgl.role": "parent", "dmgl.seeds": "0,1"}
        )
        tracker.log_params(parent_id, {**params, "seeds": "0,1"})
        for seed in (0, 1):
            child = tracker.start_run(
                experiment_id,
                f"concat-{strategy}-{index}-seed{seed}",
                {**tags, "dmgl.role": "seed", "dmgl.seed": str(seed)},
                parent_id=parent_id,
            )
            tracker.log_params(child, {**params, "train.seed": seed})
            tracker.log_metrics(child, {"final_test_acc": 0.6 + seed / 100, "final_val_acc": 0.6})
            tracker.end_run(child, "FINISHED")
        tracker.log_metrics(parent_id, {"final_test_acc": 0.605, "final_test_acc_std": 0.007})
        tracker.end_run(parent_id, "FINISHED")
        first_parent = first_parent or parent_id
    print(f"generated {3 * parents} runs in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return parent_id, first_parent


def heavy_imports(command: list[str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    return [name for name in HEAVY if name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="Runs in the generated store (default 200).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each command (default 3).")
    parser.add_argument("--home", type=Path, help="Registry to generate into and keep (default: a temporary one).")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="dmgl-cli-latency-")) / "registry"
    os.environ["DMGL_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parent_id, other_parent = generate_store(args.runs)
    dmgl = [sys.executable, "-m", "dmgl_cli"]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "dmgl --help": [*dmgl, "--help"],
        "runs list": [*dmgl, "runs", "list"],
        "runs show PREFIX": [*dmgl, "runs", "show", parent_id[:8]],
        "runs show (unknown id)": [*dmgl, "runs", "show", "ffffffffff"],
        "runs compare A B": [*dmgl, "runs", "compare", parent_id[:8], other_parent[:8]],
        "report --table strategies": [*dmgl, "report", "--experiment", "latency", "--table", "strategies"],
        "train --print-config": [*dmgl, "train", "--print-config"],
        "train --dry-run": [*dmgl, "train", "--dry-run"],
        "train (unprepared dataset)": [*dmgl, "train", "--epochs", "1"],
    }
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    codes: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, command in commands.items():  # interleaved, so that load from elsewhere hits each alike
            started = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=600)
            seconds[name].append(time.perf_counter() - started)
            codes[name] = done.returncode
    print(
        f"{3 * max(1, args.runs // 3)} runs in the store, {args.repeats} repeats, {os.cpu_count()} CPUs; wall seconds per command"
    )
    print("| command | median s | min s | max s | exit | imports |\n|---|---|---|---|---|---|")
    for name, command in commands.items():
        times = seconds[name]
        imported = ", ".join(heavy_imports(command)) or "-"
        print(
            f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} | {codes[name]} "
            f"| {imported} |"
        )


if __name__ == "__main__":
    main()
