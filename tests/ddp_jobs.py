"""Train a list of configurations on the synthetic dataset in this process, data-parallel when torchrun started it.

``python -m torch.distributed.run --standalone --nproc-per-node N tests/ddp_jobs.py JOBS OUT``: every rank trains
each job of JOBS (JSON: [{"name", "overrides"}]) with the Trainer (no MLflow) and writes OUT.rank<r>.json with each
job's per-epoch history and alpha. tests/test_distributed.py calls :func:`run_jobs` in-process for the one-process
reference. Not a test module: pytest does not collect it (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from dmgl_cli.config import load_config
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.distributed import SINGLE_PROCESS, DistributedContext, init_from_environment
from dmgl_cli.train import Trainer

# Figures that are timings, not results.
TIMINGS = {"epoch_seconds", "train_samples_per_s"}


class NoSink:
    def log_metrics(self, metrics, step):
        pass

    def save_checkpoint(self, name, state):
        pass


def run_jobs(jobs: list[dict[str, Any]], distributed: DistributedContext = SINGLE_PROCESS) -> dict[str, Any]:
    results = {}
    for job in jobs:
        config = load_config("synthetic", job["overrides"])
        trainer = Trainer(config, open_dataset("synthetic"), 0, NoSink(), distributed=distributed)
        outcome = trainer.fit()
        results[job["name"]] = {
            "history": [{k: v for k, v in h.items() if k not in TIMINGS} for h in outcome.history],
            "final": outcome.final,
            # every rank's alpha after each epoch, as this rank holds it (checked bit for bit across ranks)
            # (a run whose alpha is 0 throughout logs none)
            "alphas": [h.get("alpha", 0.0) for h in outcome.history],
            "alpha_equal_on_every_rank": distributed.all_equal([h.get("alpha", 0.0) for h in outcome.history]),
            "weights_equal_on_every_rank": distributed.all_equal(
                [p.detach().cpu().numpy().tobytes() for p in trainer.model.parameters()]
            ),
        }
    return results


def main() -> None:
    torch.set_num_threads(1)
    jobs_path, out_path = sys.argv[1], sys.argv[2]
    with open(jobs_path, encoding="utf-8") as handle:
        jobs = json.load(handle)
    distributed = init_from_environment()
    results = run_jobs(jobs, distributed)
    with open(f"{out_path}.rank{distributed.rank}.json", "w", encoding="utf-8") as handle:
        json.dump({"world": distributed.world, "results": results}, handle)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
