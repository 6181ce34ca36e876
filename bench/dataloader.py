"""Does the data path keep up? Samples/s the prepared-data loader delivers / samples/s the model consumes.

Target: >= 3 (the loader should idle most of the time). Per dataset shape:

* loader: one epoch of the trainer's own training loader — memory-mapped arrays, one gather per modality per
  batch, the training transforms (3 of the 10 stored frames, flip + crop of the frames for CREMA-D), with 0 and
  N worker processes; on CUDA also the pinned, non-blocking copy to the device;
* model: training steps (forward, L_CLS + L_MM, backward, SGD step; heuristic strategy) on one batch already on
  the device, with the trainer's AMP setting.

A second table breaks the loader's time per sample into its parts (gather, frame sampling, flip, crop), which
says where to look when the ratio is low. Both are measured interleaved in one process.

    python bench/dataloader.py                                 # a few minutes on 2 CPU cores
    python bench/dataloader.py --frame-size 224 --workers 0,4  # CREMA-D's real frame size
    python bench/dataloader.py --device cuda --batch-size 256 --frame-size 224 --workers 0,8,12   # on a GPU
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 3.0


def case_settings(case: str, args) -> tuple[str, list[str], str]:
    if case == "synthetic":
        return "synthetic", [f"dataset={common.ensure_synthetic()}"], "synthetic: 2 x 32-d vectors, MLP x 2, batch 64"
    width = {"crema-tiny": common.TINY_WIDTH, "crema-resnet18": 64}[case]
    batch = args.batch_size or (32 if case == "crema-tiny" else 8)
    train = math.ceil(args.batches * batch / 0.9) + 2
    dataset = common.write_crema_shaped(
        f"crema-shaped-{args.frame_size}-{train}", train, 16, frame_size=args.frame_size
    )
    description = (
        f"{case}: 257x299 spectrogram + 10 stored frames {args.frame_size}px (3 sampled, flip+crop), "
        f"ResNet18 width {width} x 2, batch {batch}"
    )
    return "crema-d", common.crema_overrides(dataset, "resnet18", width, batch), description


def measure_case(case: str, args, workers: list[int]) -> tuple[list[list], list[list]]:
    recipe, overrides, description = case_settings(case, args)
    print(f"\n== {description}", flush=True)
    base = [*overrides, "strategy.name=heuristic", f"train.device={args.device}"]
    runners = {w: common.EpochRunner(common.load(recipe, [*base, f"data.num_workers={w}"])) for w in workers}
    return measure(case, runners, args.batches, args.model_steps, args.repeats)


def measure(case: str, runners: dict, batches: int, model_steps: int, repeats: int) -> tuple[list[list], list[list]]:
    """Loader and model rates of ``runners`` (EpochRunners keyed by their loader's worker count, all on one dataset
    and device), interleaved; the table rows, and the loader's breakdown per stage."""
    import torch

    from dmgl_cli.device import autocast as _autocast
    from dmgl_cli.device import to_device as _to_device
    from dmgl_cli.losses import total_loss
    from dmgl_cli.train import compute_losses

    workers = list(runners)
    model_runner = runners[workers[0]]
    trainer, method, config = model_runner.trainer, model_runner.trainer.method, model_runner.config
    device = trainer.device
    sync = device.type == "cuda"
    batch = next(iter(trainer.train_loader))
    inputs, labels = _to_device(batch, device)
    batch_size = int(labels.shape[0])
    if sync:
        inputs = {m: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for m, x in inputs.items()}

    def model_rate() -> float:
        def steps() -> None:
            for _ in range(model_steps):
                with _autocast(device, config.train.amp):
                    output = method.forward(trainer.model, inputs, training=True)
                cls_loss, mm_loss = compute_losses(method, config, output, labels)
                trainer.optimizer.zero_grad(set_to_none=True)
                total_loss(0.5, cls_loss, mm_loss).backward()
                trainer.optimizer.step()

        return model_steps * batch_size / common.timed(steps, sync)

    epochs = iter(range(1, 1_000_000))

    def loader_rate(w: int):
        def call() -> float:
            loader = runners[w].trainer.train_loader
            loader.batch_sampler.set_epoch(next(epochs))  # a fresh order each time, as a new epoch has
            seen = 0
            started = time.perf_counter()
            for number, item in enumerate(loader):
                if sync:  # delivered means on the device
                    _to_device(item, device)
                seen += int(item["labels"].shape[0])
                if number + 1 >= batches:
                    break
            if sync:
                torch.cuda.synchronize()
            return seen / (time.perf_counter() - started)

        return call

    calls = {"model": model_rate}
    calls.update({f"loader, {w} workers": loader_rate(w) for w in workers})
    rates = common.interleave(calls, repeats, warmup=1)
    model = common.median(rates["model"])
    rows = [[case, "model (training step)", model, "", "", ""]]
    for w in workers:
        name = f"loader, {w} workers"
        ratios = common.paired_ratios(rates[name], rates["model"])
        rows.append(
            [
                case,
                name,
                common.median(rates[name]),
                common.median(ratios),
                common.spread(ratios),
                f">= {TARGET:g} {common.verdict(common.median(ratios), TARGET, False)}",
            ]
        )
    parts = loader_parts(case, runners[workers[0]].trainer.splits.train, batch_size, repeats)
    return rows, parts


def loader_parts(case: str, split, batch_size: int, repeats: int) -> list[list]:
    """Milliseconds per sample of each stage of the training loader (in this process, no workers)."""
    import numpy as np

    from dmgl_cli.data.transforms import BatchTransform

    transform = split.transform
    positions = list(range(min(batch_size, len(split))))
    rows = split.indices[np.asarray(positions)]
    split.transform = None
    try:
        raw = split.__getitems__(positions)
        order = np.argsort(rows, kind="stable")
        restore = np.empty_like(order)
        restore[order] = np.arange(len(order))

        def gather_twice() -> None:  # the loader before bench/dataloader.py: sorted fancy index, then reorder
            for array in split.arrays.inputs.values():
                np.ascontiguousarray(array[rows[order]][restore])

        stages = {
            "gather as before (sort, fancy index, reorder: 2 copies)": gather_twice,
            "gather (memory-mapped arrays -> batch)": lambda: split.__getitems__(positions),
        }
        if transform is not None:
            frames_only = BatchTransform(transform.frames, {}, transform.crop_scale, transform.seed, True)
            stages["frame sampling"] = lambda: frames_only(raw["inputs"], rows)
            flips = {m: "flip" for m, mode in transform.augment.items() if "flip" in mode}
            if flips:
                flip = BatchTransform(transform.frames, flips, transform.crop_scale, transform.seed, True)
                stages["frame sampling + flip"] = lambda: flip(raw["inputs"], rows)
            stages["all training transforms"] = lambda: transform(raw["inputs"], rows)
        times = common.interleave(
            {k: (lambda f=f: common.timed(f)) for k, f in stages.items()}, repeats + 1, warmup=1, progress=False
        )
    finally:
        split.transform = transform
    return [[case, stage, 1000 * min(values) / len(positions)] for stage, values in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        default="synthetic,crema-tiny,crema-resnet18",
        help="comma-separated: synthetic, crema-tiny, crema-resnet18",
    )
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts for the loader")
    parser.add_argument("--frame-size", type=int, default=112, help="stored frame side (CREMA-D: 224)")
    parser.add_argument("--batch-size", type=int, help="CREMA-D-shaped cases (default 32 tiny, 8 ResNet18)")
    parser.add_argument("--batches", type=int, default=8, help="batches per loader measurement")
    parser.add_argument("--model-steps", type=int, default=3, help="training steps per model measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of the model (default 1: steadier timings on a shared machine)",
    )
    args = parser.parse_args()

    common.use_private_registry()
    common.set_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    print(f"dataloader: {common.machine_line()}")
    print(f"note: {common.INTERLEAVE_NOTE}")
    rows, parts = [], []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        case_rows, case_parts = measure_case(case, args, workers)
        rows += case_rows
        parts += case_parts
    common.print_table(
        ["case", "what", "samples/s", "loader / model", "per-round range", "target"],
        rows,
        f"Loader samples/s / model samples/s (target >= {TARGET:g}), device {args.device}",
    )
    common.print_table(
        ["case", "loader stage (cumulative)", "ms per sample"],
        parts,
        "Where the loader's time goes (one process, best of the repeats)",
    )


if __name__ == "__main__":
    main()
