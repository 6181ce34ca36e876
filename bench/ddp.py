"""Data-parallel training against one process, through the real command: `dmgl train --nproc N`.

On the CPU (gloo), for Concat (constant alpha 0), Ours-H and Ours-LB on the built-in synthetic dataset, it trains the
same run in 1 and in N processes and prints, from what MLflow recorded, the largest |difference| per epoch of the
losses, the metrics and alpha, and the time ratio (N-process wall time / 1-process, whole command, start-up
included; and the ratio of the mean epoch time). On a machine with several GPUs, `--device cuda` trains on all of
them and prints the scaling efficiency: samples/s at N / (N x samples/s at 1).

    python bench/ddp.py                                   # CPU, 2 processes, ~2 minutes on 2 cores
    python bench/ddp.py --strategies lb --epochs 5 --nproc 2
    python bench/ddp.py --set model.encoders.default.hidden=1024 --set train.batch_size=256   # more work per step
    python bench/ddp.py --device cuda --recipe crema-d --strategies lb --epochs 1   # bench/gpu.sh runs this

The registry is a temporary folder (DMGL_HOME); nothing is written to yours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = {
    "concat": ["--strategy", "constant:0"],
    "heuristic": ["--strategy", "heuristic"],
    "lb": ["--strategy", "lb"],
}
TIMINGS = ("epoch_seconds", "train_samples_per_s")


def dmgl(args: list[str], env: dict[str, str]) -> tuple[dict, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dmgl_cli", *args, "--json", "--silent"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode != 0:
        raise SystemExit(f"dmgl {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout), time.perf_counter() - started


def histories(run_id: str) -> dict[str, list[float]]:
    from dmgl_cli.tracking import Tracker

    tracker = Tracker()
    keys = tracker.get_run(run_id).metrics
    return {key: [value for _, value in tracker.metric_history(run_id, key)] for key in keys}


def compare(one: dict[str, list[float]], many: dict[str, list[float]]) -> dict[str, float]:
    """Largest |difference| over the epochs, by kind: alpha, losses, other metrics."""
    worst = {"alpha": 0.0, "losses": 0.0, "metrics": 0.0}
    for key, values in one.items():
        if key in TIMINGS or key.startswith("final_") or key not in many:
            continue
        kind = "alpha" if key.startswith("alpha") else "losses" if "loss" in key else "metrics"
        for a, b in zip(values, many[key], strict=True):
            worst[kind] = max(worst[kind], abs(a - b))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="synthetic")
    parser.add_argument("--strategies", default="concat,heuristic,lb")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=None, help="default: 2 on the CPU, every GPU on CUDA")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe setting for both runs, e.g. model.encoders.default.hidden=1024")  # fmt: skip
    options = parser.parse_args()
    home = tempfile.mkdtemp(prefix="dmgl-ddp-bench-")
    env = {**os.environ, "DMGL_HOME": home, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    os.environ.update(DMGL_HOME=home, MLFLOW_DISABLE_TELEMETRY="true")
    if options.device == "cuda":
        import torch

        nproc = options.nproc or torch.cuda.device_count()
        if nproc < 2:
            print(f"ddp: {torch.cuda.device_count()} GPU(s) visible; scaling needs 2 or more, skipped")
            return
    else:
        nproc = options.nproc or 2
    if options.recipe == "synthetic":
        subprocess.run([sys.executable, "-m", "dmgl_cli", "prepare", "synthetic", "--silent"], env=env, check=True)
    common = [
        "--recipe", options.recipe, "--epochs", str(options.epochs),
        "--set", f"train.batch_size={options.batch_size}", "--set", f"train.device={options.device}",
        *(token for setting in options.overrides for token in ("--set", setting)),
    ]  # fmt: skip
    print(
        f"ddp: {options.recipe}, {options.epochs} epochs, global batch {options.batch_size}, "
        f"{options.device}, 1 vs {nproc} processes ({os.cpu_count()} CPU cores)"
    )
    print(f"{'strategy':10s} {'max|d alpha|':>12s} {'max|d loss|':>12s} {'max|d metric|':>13s} "
          f"{'time 1 (s)':>10s} {'time N (s)':>10s} {'ratio':>6s} {'epoch ratio':>11s} {'efficiency':>10s}")  # fmt: skip
    for name in options.strategies.split(","):
        single, single_s = dmgl(["train", *common, *STRATEGIES[name], "--name", f"{name}-1"], env)
        multi, multi_s = dmgl(["train", *common, *STRATEGIES[name], "--name", f"{name}-n", "--nproc", str(nproc)], env)
        one, many = histories(single["seeds"][0]["run_id"]), histories(multi["seeds"][0]["run_id"])
        worst = compare(one, many)
        epoch_one = sum(one["epoch_seconds"]) / len(one["epoch_seconds"])
        epoch_many = sum(many["epoch_seconds"]) / len(many["epoch_seconds"])
        speed_one = sum(one["train_samples_per_s"]) / len(one["train_samples_per_s"])
        speed_many = sum(many["train_samples_per_s"]) / len(many["train_samples_per_s"])
        print(
            f"{name:10s} {worst['alpha']:12.2e} {worst['losses']:12.2e} {worst['metrics']:13.2e} "
            f"{single_s:10.1f} {multi_s:10.1f} {multi_s / single_s:6.2f} {epoch_many / epoch_one:11.2f} "
            f"{speed_many / (nproc * speed_one):10.2f}"
        )
    print("ratio: whole command, N / 1; epoch ratio: mean epoch time, N / 1; efficiency: samples/s at N / (N x at 1)")


if __name__ == "__main__":
    main()
