"""Data-parallel training (gloo, 2 CPU processes) against one process.

* The Trainer at 2 processes (torchrun running tests/ddp_jobs.py) matches 1 process for Concat, Ours-H, Ours-LB
  (identity, cg, neumann) and every method that trains data-parallel: per-epoch losses, metrics and alpha within
  float tolerance; alpha and the weights are bit-identical on both ranks.
* `dmgl train --nproc 2` records one parent and one seed run (rank 0 only), with the 1-process results.
* A killed rank ends the job with one clear error; the run resumes in 1 process and ends as an uninterrupted run.
* Methods and settings that cannot run data-parallel are refused before any process starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ddp_jobs import TIMINGS, run_jobs
from processes import finish

from dmgl_cli.imbalance import MACHINE_MEASURED
from dmgl_cli.methods import METHODS
from dmgl_cli.tracking import Tracker

TESTS = Path(__file__).resolve().parent

# Measured on this test's data (600 samples, 2 epochs, batch 64): at most 1.4e-6 on losses, 3.8e-6 on alpha (Neumann,
# CG), 1.1e-5 on metrics (G-Blend's estimates), 0 on MAP: the slices' matrix products round differently from the
# whole batch's. On the 1800-sample default data, MAP's near-tied scores turned those into up to 2e-4.
TOLERANCE = 1e-4
MAP_TOLERANCE = 1e-3

BASE = ["train.epochs=2", "train.batch_size=64"]
COMPARISON = ["strategy.name=constant", "strategy.alpha=0"]
# Options that make a method act within 2 short epochs (OGM-GE's default modulates 4-D conv kernels only, which
# MLPs lack). MLA's default `elementwise` projection divides by (a + k_i r_j) entry by entry, which amplifies float
# rounding without bound (its 1-process runs are just as sensitive to any change of summation order); `scalar` is
# OWM's denominator.
METHOD_OPTIONS = {
    "ogm-ge": ["method.options.ogm-ge.params=weights"],
    "g-blend": ["method.options.g-blend.copy_epochs=2", "method.options.g-blend.super_epoch=1"],
    "unimodal": ["method.options.unimodal.modality=slow"],
    "mla": ["method.options.mla.denominator=scalar"],
}


def _jobs() -> list[dict]:
    jobs = [
        {"name": "concat", "overrides": [*BASE, *COMPARISON]},
        {"name": "heuristic", "overrides": [*BASE, "strategy.name=heuristic"]},
        {"name": "lb", "overrides": [*BASE, "strategy.lb.update_every=4"]},
        {
            "name": "lb-cg",
            "overrides": [*BASE, "strategy.lb.approx=cg", "strategy.lb.terms=3", "strategy.lb.update_every=4"],
        },
        {
            "name": "lb-neumann",
            "overrides": [*BASE, "strategy.lb.approx=neumann", "strategy.lb.terms=3", "strategy.lb.update_every=4"],
        },
    ]
    for name, method in METHODS.items():
        if name == "concat" or method.data_parallel_refusal:
            continue
        strategy = [] if method.strategies == ("lb",) else COMPARISON
        jobs.append(
            {"name": name, "overrides": [*BASE, f"method.name={name}", *strategy, *METHOD_OPTIONS.get(name, [])]}
        )
    return jobs


def _env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _finish(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    return finish(process, timeout, "the data-parallel job")


@contextlib.contextmanager
def _group(args: list[str]):
    """A command in its own process group (torchrun's agent and its workers), killed as a group on the way out."""
    process = subprocess.Popen(
        args, cwd=TESTS.parent, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            process.communicate(timeout=10)


def _differences(reference: list[dict], other: list[dict]) -> dict[str, float]:
    assert len(reference) == len(other)
    worst: dict[str, float] = {}
    for one, two in zip(reference, other, strict=True):
        assert set(one) == set(two)
        for key in one:
            worst[key] = max(worst.get(key, 0.0), abs(one[key] - two[key]))
    return worst


@pytest.mark.integration
def test_two_processes_train_as_one(synthetic, tmp_path):
    jobs = _jobs()
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    with _group([*command, str(TESTS / "ddp_jobs.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out")]) as job:
        _, err = _finish(job, timeout=170)
        assert job.returncode == 0, err[-4000:]
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    reference = run_jobs(jobs)
    for job_spec in jobs:
        name = job_spec["name"]
        first, second = ranks[0]["results"][name], ranks[1]["results"][name]
        # both ranks hold the same alpha and the same weights, bit for bit, after every epoch
        assert first["alpha_equal_on_every_rank"] and first["weights_equal_on_every_rank"], name
        assert first["alphas"] == second["alphas"], name
        assert first["history"] == second["history"], name
        worst = _differences(reference[name]["history"], first["history"])
        assert not set(worst) & TIMINGS
        for key, difference in worst.items():
            limit = MAP_TOLERANCE if "_map" in key else TOLERANCE
            assert difference <= limit, f"{name}: {key} differs by {difference:.3g} from one process"
    # the learnt alpha moved, so its equality is not that of a constant; the CG job took curvature products (its
    # untrusted solves fall back to identity, so its alpha may walk as identity's)
    assert reference["lb"]["alphas"][0] != 0.5 and reference["lb-cg"]["history"][-1]["alpha_hessian_products"] > 0


def _dmgl(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmgl_cli", *args]


def _finals(document: dict) -> dict[str, float]:
    """The first seed's final metrics but time and memory, which the machine measures (never equal)."""
    return {k: v for k, v in document["seeds"][0]["final"].items() if k not in MACHINE_MEASURED}


@pytest.mark.integration
def test_dmgl_train_nproc_records_once_with_single_process_results(synthetic, run_cli, registry):
    settings = ["--epochs", "2", "--set", "train.batch_size=64", "--json", "--silent"]
    single = json.loads(run_cli("train", "--strategy", "lb", "--name", "one", *settings).output)
    with _group(_dmgl("train", "--strategy", "lb", "--name", "two", "--nproc", "2", *settings)) as job:
        out, err = _finish(job, timeout=170)
    assert job.returncode == 0, err[-4000:]
    double = json.loads(out)  # rank 0 alone printed: one JSON document
    worst = max(abs(_finals(single)[k] - _finals(double)[k]) for k in _finals(single))
    assert worst <= MAP_TOLERANCE
    tracker = Tracker()
    experiment = tracker.experiment_id("synthetic", create=False)
    runs = tracker.search([experiment], "tags.`mlflow.runName` LIKE 'two%'")
    assert sorted(r.tags["dmgl.role"] for r in runs) == ["parent", "seed"]  # rank 1 recorded nothing
    assert all(r.status == "FINISHED" for r in runs)
    seed_run = next(r for r in runs if r.tags["dmgl.role"] == "seed")
    assert [v for _, v in tracker.metric_history(seed_run.run_id, "alpha")] == [
        v for _, v in tracker.metric_history(single["seeds"][0]["run_id"], "alpha")
    ] or max(
        abs(a - b)
        for (_, a), (_, b) in zip(
            tracker.metric_history(seed_run.run_id, "alpha"),
            tracker.metric_history(single["seeds"][0]["run_id"], "alpha"),
            strict=True,
        )
    ) <= TOLERANCE
    assert tracker.load_checkpoint(seed_run.run_id, "last")["epoch"] == 2


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children (torchrun's workers)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            if parent != launcher:
                continue
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environment = handle.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment:
            return int(entry)
    return None


def _seed_run_under_way(job: subprocess.Popen, name: str, epochs: int = 2):
    """The seed run of parent ``name`` once it has logged ``epochs`` epochs (the job still running)."""
    tracker, deadline = Tracker(), time.monotonic() + 150
    while time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.5)
        with contextlib.suppress(Exception):  # the store or the run may not exist yet
            experiment = tracker.experiment_id("synthetic", create=False)
            runs = tracker.search([experiment], f"tags.`mlflow.runName` = '{name}-seed0'")
            if runs and len(tracker.metric_history(runs[0].run_id, "alpha")) >= epochs:
                return runs[0]
    raise AssertionError(f"training did not get under way (exit status {job.poll()})")


@pytest.mark.integration
def test_a_killed_rank_stops_the_job_and_the_run_resumes_in_one_process(synthetic, run_cli, registry):
    settings = ["--strategy", "lb", "--epochs", "30", "--set", "train.batch_size=64"]
    with _group(_dmgl("train", *settings, "--name", "killed", "--nproc", "2", "--silent")) as job:
        seed_run = _seed_run_under_way(job, "killed")
        victim = _rank_pid(job.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        _, err = _finish(job, timeout=120)
    assert job.returncode == 1
    parent_id = seed_run.tags["mlflow.parentRunId"]
    assert f"rank 1 (pid {victim}) was killed by SIGKILL; torchrun then stopped rank 0" in err
    assert f"dmgl train --resume {parent_id}" in err
    assert "Traceback" not in err
    tracker = Tracker()
    run_cli("runs", "reconcile", "--older-than", "0")
    assert all(r.status != "RUNNING" for r in (tracker.get_run(parent_id), tracker.get_run(seed_run.run_id)))
    checkpoint = tracker.load_checkpoint(seed_run.run_id, "last")
    assert 2 <= checkpoint["epoch"] < 30
    resumed = json.loads(run_cli("train", "--resume", parent_id, "--json", "--silent").output)
    assert tracker.get_run(seed_run.run_id).status == "FINISHED"
    alphas = [v for _, v in tracker.metric_history(seed_run.run_id, "alpha")]
    assert len(alphas) == 30
    uninterrupted = json.loads(run_cli("train", *settings, "--name", "whole", "--json", "--silent").output)
    worst = max(abs(_finals(resumed)[k] - _finals(uninterrupted)[k]) for k in _finals(uninterrupted))
    assert worst <= MAP_TOLERANCE


@pytest.mark.integration
def test_ctrl_c_stops_every_rank_and_the_run_resumes_with_two(synthetic, registry):
    settings = ["--strategy", "lb", "--epochs", "12", "--set", "train.batch_size=64", "--silent"]
    with _group(_dmgl("train", *settings, "--name", "stopped", "--nproc", "2")) as job:
        seed_run = _seed_run_under_way(job, "stopped")
        os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C does: every process of the terminal's group gets it
        _, err = _finish(job, timeout=60)
    parent_id = seed_run.tags["mlflow.parentRunId"]
    assert job.returncode == 130
    assert err.count("Interrupted") == 1 and f"dmgl train --resume {parent_id}" in err, err
    tracker = Tracker()
    assert tracker.get_run(seed_run.run_id).status == "KILLED"
    with _group(_dmgl("train", "--resume", parent_id, "--nproc", "2", "--json", "--silent")) as job:
        out, err = _finish(job, timeout=150)
    assert job.returncode == 0, err[-3000:]
    assert json.loads(out)["complete"]
    assert tracker.get_run(seed_run.run_id).status == "FINISHED"
    assert len(tracker.metric_history(seed_run.run_id, "alpha")) == 12


def test_methods_that_cannot_run_data_parallel_are_refused(synthetic, run_cli, registry):
    result = run_cli("train", "--method", "greedy", "--nproc", "2", expect=1)
    assert "method greedy cannot train data-parallel" in result.output
    assert "leave out --nproc" in result.output
    result = run_cli("train", "--nproc", "2", "--set", "train.batch_size=1", expect=1)
    assert "2 processes need training batches of at least 2 samples" in result.output
    result = run_cli("train", "--nproc", "0", expect=2)
    assert "--nproc" in result.output
    assert not (registry / "mlflow.db").exists() or not Tracker().search(
        [Tracker().experiment_id("synthetic")], "tags.`dmgl.role` = 'parent'"
    )
    # only greedy is refused; every other method is in the equivalence test above
    assert [name for name, method in METHODS.items() if method.data_parallel_refusal] == ["greedy"]


def test_nproc_inside_torchrun_is_refused(run_cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_cli("train", "--nproc", "2", expect=1)
    assert "under torchrun, leave it out" in result.output


# ---------------------------------------------------------------------------------------------- no processes needed
@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_reads_its_slice_transformed_as_in_the_whole_batch(tmp_path, world):
    """Frame sampling, flips and crops are drawn for the whole global batch: rank r's part is bit for bit rows
    [start, stop) of the batch one process reads."""
    import numpy as np
    import torch

    from dmgl_cli.data.loader import ArraySplit
    from dmgl_cli.data.prepared import SplitArrays
    from dmgl_cli.data.transforms import BatchTransform
    from dmgl_cli.distributed import slice_bounds

    rng = np.random.default_rng(5)
    arrays = SplitArrays(
        labels=np.arange(30, dtype=np.int64) % 3,
        inputs={
            "visual": rng.integers(0, 256, (30, 6, 20, 20, 3), dtype=np.uint8),
            "audio": rng.standard_normal((30, 8, 5)).astype(np.float32),
        },
    )
    transform = BatchTransform({"visual": 2}, {"visual": "flip_crop"}, 0.6, seed=4, training=True)
    positions = [9, 2, 27, 14, 0, 5, 21]  # 7 rows: slices of unequal sizes
    whole = ArraySplit(arrays, transform=transform).__getitems__(positions)
    parts = []
    for rank in range(world):
        split = ArraySplit(arrays, transform=transform)
        split.shard = (rank, world)
        parts.append(split.__getitems__(positions))
        start, stop = slice_bounds(len(positions), rank, world)
        assert len(parts[-1]["labels"]) == stop - start
    for name in ("visual", "audio"):
        assert torch.equal(torch.cat([p["inputs"][name] for p in parts]), whole["inputs"][name])
    assert torch.equal(torch.cat([p["labels"] for p in parts]), whole["labels"])


def test_sharded_evaluation_batches_merge_to_the_single_process_metrics():
    """Whole batches go to rank i mod N; their records, interleaved back, give the metrics of one pass, exactly."""
    import torch

    from dmgl_cli.data.loader import EpochBatchSampler
    from dmgl_cli.distributed import interleave_shards
    from dmgl_cli.metrics import MetricAccumulator

    sampler = EpochBatchSampler(23, 4, shuffle=False, seed=0, drop_last=False)
    batches = list(sampler)
    shards = []
    for rank in range(3):
        sharded = EpochBatchSampler(23, 4, shuffle=False, seed=0, drop_last=False, batch_shard=(rank, 3))
        shards.append(list(sharded))
        assert len(sharded) == len(shards[-1])
    assert interleave_shards(shards) == batches

    generator = torch.Generator().manual_seed(0)
    data = [
        (torch.randint(0, 3, (len(b),), generator=generator), torch.randn(len(b), 3, generator=generator))
        for b in batches
    ]

    def add(accumulator, labels, logits):
        accumulator.add(
            labels, logits, {"a": logits * 0.5, "b": -logits}, {"a": logits, "b": logits.flip(1)},
            {"cls_loss": logits.square().mean()}, len(labels),
        )  # fmt: skip

    single = MetricAccumulator()
    for labels, logits in data:
        add(single, labels, logits)
    per_rank = []
    for rank in range(3):
        accumulator = MetricAccumulator()
        for labels, logits in data[rank::3]:
            add(accumulator, labels, logits)
        per_rank.append(accumulator.batch_records())
    merged = MetricAccumulator()
    merged.add_records(interleave_shards(per_rank))
    assert merged.compute("val") == single.compute("val")


def test_a_missing_dataset_is_refused_before_any_process_starts(run_cli, registry):
    result = run_cli("train", "--nproc", "2", expect=1)
    assert "dataset 'synthetic' is not prepared" in result.output
    assert result.output.count("Error") == 1
    assert not registry.exists() or not any(registry.iterdir())  # nothing recorded, no store created


def test_the_failure_named_is_the_cause_not_the_ranks_that_stopped_because_of_it():
    """A rank killed by a signal is the cause; a rank whose collective lost its peer (LOST_PEER_STATUS, often
    recorded first and in the same second) and a rank torchrun stopped with SIGTERM are its effects."""
    from types import SimpleNamespace

    from dmgl_cli.distributed import LOST_PEER_STATUS, _failure_message

    def failure(pid, exitcode, timestamp):
        return SimpleNamespace(pid=pid, exitcode=exitcode, timestamp=timestamp)

    lost_peer_first = SimpleNamespace(
        failures={0: failure(10, LOST_PEER_STATUS, 5), 1: failure(11, -signal.SIGKILL, 5)}
    )
    message = _failure_message(lost_peer_first, "RUN", signal)
    assert "rank 1 (pid 11) was killed by SIGKILL; torchrun then stopped rank 0." in message
    assert "dmgl train --resume RUN" in message
    stopped = SimpleNamespace(failures={0: failure(10, -signal.SIGTERM, 4), 1: failure(11, 1, 5), 2: failure(12, 1, 6)})
    assert "rank 1 (pid 11) exited with status 1; torchrun then stopped ranks 0, 2" in _failure_message(
        stopped, None, signal
    )
    only_effects = SimpleNamespace(failures={0: failure(10, LOST_PEER_STATUS, 3), 1: failure(11, -signal.SIGTERM, 4)})
    assert "rank 0 (pid 10) exited with status 75; torchrun then stopped rank 1" in _failure_message(
        only_effects, None, signal
    )
