"""Checkpoints of a CREMA-D-shaped ResNet18 run: the time they hold the training thread, with the background writer
and without it (each checkpoint written in place, as before), and their bytes on disk per seed.

Each variant trains one seed through ``run.training.train`` (the real tracker, ``checkpoints/{last,best}.pt`` in the
local MLflow store, the logged model), interleaved (background, synchronous, background, ...). Figures per run:

* **epoch s**: the trainer's own ``epoch_seconds`` (training only), median over the run's epochs: does a write in
  the background slow the steps it overlaps?
* **checkpoint s / epoch on the training thread**: the seconds ``save_checkpoint`` and the waits for the writer
  (before reading a checkpoint, at the run's end) held the training thread, per epoch;
* **outside training s / epoch**: the seed's wall time less its epochs' training time, per epoch (validation, test,
  checkpoints, MLflow; the end-of-run Shapley pass and the logged model included);
* **disk per seed**: the seed run's artifacts and its logged model, each file counted once per inode (what ``du``
  reports) and as the sum of the names' sizes (the layout before the model shared the run's ``best.pt``, which
  held a copy).

``--sections calls`` (also by default): the steady state without the start and end of a run, a real trainer's
``last.pt`` (and ``best.pt``) saved through the tracker epoch after epoch, the variants alternating, a pause standing
in for training: the seconds the saves hold the training thread in an epoch with a new best and one without.

    python bench/checkpoints.py                       # ResNet18 x 2 (the real width), 3 epochs, 2 repeats
    python bench/checkpoints.py --sections calls      # the steady state alone, ~1 minute
    python bench/checkpoints.py --epochs 4 --repeats 3 --train 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def disk_bytes(folders: list[Path]) -> tuple[int, int]:
    """(bytes once per inode, bytes per name) of the files under ``folders``."""
    inodes: dict[tuple[int, int], int] = {}
    named = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                stat = path.stat()
                inodes[(stat.st_dev, stat.st_ino)] = stat.st_size
                named += stat.st_size
    return sum(inodes.values()), named


class Blocked:
    """Seconds the calling (training) thread spends in checkpoint saves and in waits for the writer."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args: Any, **kwargs: Any):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def calls_section(config, args, background_submit, synchronous_submit) -> None:
    """Steady state: a real trainer's checkpoints saved through the tracker epoch after epoch, the variants
    alternating, with ``--pause`` seconds standing in for training between epochs; the seconds each epoch's saves
    hold the calling thread, for an epoch with a new best (best.pt then last.pt) and one without (last.pt)."""
    from dmgl_cli.checkpoint import CheckpointWriter
    from dmgl_cli.tracking import Tracker
    from dmgl_cli.train import Trainer

    trainer = Trainer(config, common.open_dataset(config.dataset), 0, common.MemorySink())
    tracker = Tracker()
    run_id = tracker.start_run(tracker.experiment_id("checkpoint-calls"), "calls", {})
    held: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.calls_epochs):
        for name, submit in (("background writer", background_submit), ("synchronous (before)", synchronous_submit)):
            CheckpointWriter.submit = submit
            for kind in ("new best", "no new best"):
                started = time.perf_counter()
                if kind == "new best":
                    tracker.save_checkpoint(run_id, "best", {"kind": "best", "model": trainer.model.state_dict()})
                tracker.save_checkpoint(run_id, "last", trainer.state_dict())
                held.setdefault((name, kind), []).append(time.perf_counter() - started)
                time.sleep(args.pause)
            tracker.wait_for_checkpoints()
    CheckpointWriter.submit = background_submit
    tracker.wait_for_checkpoints(release=True)
    tracker.end_run(run_id, "FINISHED")
    rows = [[name, kind, common.median(values[1:]), common.spread(values[1:])] for (name, kind), values in held.items()]
    common.print_table(
        ["checkpoints", "epoch", "s on the training thread", "range"],
        rows,
        f"Checkpoint saves alone, steady state: {args.calls_epochs - 1} epochs of each kind per variant after one "
        f"left out, {args.pause} s of stand-in training between them (last.pt "
        f"{sum(t.numel() * t.element_size() for t in _state_tensors(trainer.state_dict())) / 1e6:.0f} MB of tensors)",
    )


def _state_tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _state_tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _state_tensors(v)]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=64, help="training clips (the checkpoint's size does not vary)")
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--width", type=int, default=64, help="ResNet18 width (64: the real one, ~183 MB last.pt)")
    parser.add_argument("--frame-size", type=int, default=112, help="stored frame size (training time only)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sections", default="runs,calls", help="comma-separated: runs, calls")
    parser.add_argument("--calls-epochs", type=int, default=8, help="calls: epochs of each kind per variant")
    parser.add_argument("--pause", type=float, default=1.5, help="calls: seconds standing in for an epoch's training")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}

    common.use_private_registry()
    common.set_threads(args.threads)
    from dmgl_cli.checkpoint import CheckpointWriter
    from dmgl_cli.run import training
    from dmgl_cli.tracking import Tracker, local_path

    print(f"checkpoints: {common.machine_line()}")
    print(f"note: {common.INTERLEAVE_NOTE}")
    dataset = common.write_crema_shaped("crema-ckpt", args.train, args.test, frame_size=args.frame_size)
    overrides = common.crema_overrides(dataset, "resnet18", args.width, args.batch_size, sampled_frames=1)
    config = common.load("crema-d", [*overrides, f"train.epochs={args.epochs}", "train.device=cpu"])

    background_submit = CheckpointWriter.submit

    def synchronous_submit(self, write, state, what):  # the writer bypassed: written in place, as before
        self.wait()
        write(state)

    if "calls" in sections:
        calls_section(config, args, background_submit, synchronous_submit)
    if "runs" not in sections:
        return

    rows: dict[str, dict[str, list[float]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    runs = iter(range(1_000_000))

    def variant(name: str, submit):
        def call() -> float:
            blocked = Blocked()
            CheckpointWriter.submit = submit
            originals = {key: getattr(Tracker, key) for key in ("save_checkpoint", "wait_for_checkpoints")}
            for key, function in originals.items():
                setattr(Tracker, key, blocked.wrap(function))
            tracker = Tracker()
            started = time.perf_counter()
            try:
                outcome = training.train(config, [0], tracker=tracker, run_name=f"{name.split()[0]}-{next(runs)}")
            finally:
                for key, function in originals.items():
                    setattr(Tracker, key, function)
                CheckpointWriter.submit = background_submit
            wall = time.perf_counter() - started
            seed_run = outcome.seeds[0].run_id
            epochs = [seconds for _, seconds in tracker.metric_history(seed_run, "epoch_seconds")]
            folders = [local_path(tracker.get_run(seed_run).artifact_uri)]
            model_id = tracker.logged_model_id(seed_run)
            if model_id is not None:
                folders.append(local_path(tracker.client.get_logged_model(model_id).artifact_location))
            sizes[name] = disk_bytes([f for f in folders if f is not None])
            figures = rows.setdefault(name, {})
            figures.setdefault("epoch", []).append(statistics.median(epochs))
            figures.setdefault("blocked", []).append(blocked.seconds / len(epochs))
            figures.setdefault("outside", []).append((wall - sum(epochs)) / len(epochs))
            return blocked.seconds / len(epochs)

        return call

    variants = {
        "background writer": variant("background writer", background_submit),
        "synchronous (before)": variant("synchronous (before)", synchronous_submit),
    }
    common.interleave(variants, args.repeats, warmup=1)
    for figures in rows.values():  # the warm-up round is left out, as in interleave's figures
        for key in figures:
            figures[key] = figures[key][1:]
    background, synchronous = rows["background writer"], rows["synchronous (before)"]
    table = []
    for name, figures in rows.items():
        table.append(
            [
                name,
                common.median(figures["epoch"]),
                common.median(figures["blocked"]),
                common.median(figures["outside"]),
                common.median(common.paired_ratios(figures["blocked"], synchronous["blocked"])),
                common.median(common.paired_ratios(figures["epoch"], synchronous["epoch"])),
            ]
        )
    common.print_table(
        [
            "checkpoints",
            "epoch s",
            "checkpoint s/epoch on the training thread",
            "outside training s/epoch",
            "checkpoint time vs synchronous",
            "epoch time vs synchronous",
        ],
        table,
        f"ResNet18 x 2 (width {args.width}), {args.train} training clips, batch {args.batch_size}, {args.epochs} "
        f"epochs a run; medians of {args.repeats} interleaved runs ({len(background['epoch'])} recorded)",
    )
    once, per_name = sizes["background writer"]
    common.print_table(
        ["layout", "MB per seed (once per inode, as du counts)", "MB per seed (per name)"],
        [["best.pt shared by the run and its logged model", once / 1e6, per_name / 1e6]],
        "Bytes on disk per seed: checkpoints/{last,best}.pt, the logged model, config, metrics and plots "
        "(the per-name sum is the layout before, where the model held its own copy of best.pt)",
    )


if __name__ == "__main__":
    main()
