"""Does the data path keep up? Samples/s the prepared-data loader delivers / samples/s the model consumes, the
bytes it reads per sample against the bytes the model consumes, and its memory.

Target: >= 3 (the loader should idle most of the time). Per dataset shape, frame store (raw uint8 frames, or JPEG
decoded per batch: the preparers' ``-o frame_store=raw|jpeg``) and loader worker count:

* loader: one epoch of the trainer's own training loader — memory-mapped arrays, only the sampled frames read (3
  of the 10 stored by default, ``--sampled-frames``; decoded from JPEG in the jpeg store), flip + crop of the frames
  for CREMA-D, with 0 and N worker processes; on CUDA also the pinned, non-blocking copy to the device;
* model: training steps (forward, L_CLS + L_MM, backward, SGD step; heuristic strategy) on one batch already on
  the device, with the trainer's AMP setting.

Both are measured interleaved in one process. Then, untimed:

* bytes per sample: what the gather reads from the store (counting proxies around the memory-mapped arrays; for
  the jpeg store the compressed frames and their offsets) against what the model consumes (the batch's input
  tensors, = the decoded bytes), and what the former full gather of every stored frame read;
* memory: peak RSS and PSS of this process and the loader's workers (``common.MemoryWatch`` over the process tree)
  during one more epoch of each configuration, started with no other loader's workers alive;
* where the loader's time goes per sample (one process): the former full gather + frame sampling, the frame-only
  gather, flip, crop.

    python bench/dataloader.py                                 # a few minutes on 2 CPU cores
    python bench/dataloader.py --frame-size 224 --workers 0,4  # CREMA-D's real frame size
    python bench/dataloader.py --cases crema-resnet18 --frame-size 224 --frame-stores raw,jpeg --workers 0,2
    python bench/dataloader.py --device cuda --batch-size 256 --frame-size 224 --workers 0,8,12   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 3.0
FRAME_STORES = ("raw", "jpeg")


def case_stores(case: str, stores: list[str]) -> list[str]:
    """The frame stores a case is measured with: the synthetic vectors have no frames."""
    return ["-"] if case == "synthetic" else stores


def case_settings(case: str, args, store: str) -> tuple[str, list[str], str]:
    if case == "synthetic":
        return "synthetic", [f"dataset={common.ensure_synthetic()}"], "synthetic: 2 x 32-d vectors, MLP x 2, batch 64"
    width = {"crema-tiny": common.TINY_WIDTH, "crema-resnet18": 64}[case]
    batch = args.batch_size or (32 if case == "crema-tiny" else 8)
    train = math.ceil(args.batches * batch / 0.9) + 2
    dataset = common.write_crema_shaped(
        f"crema-shaped-{args.frame_size}-{train}-{store}", train, 16, frame_size=args.frame_size, frame_store=store
    )
    description = (
        f"{case}: 257x299 spectrogram + 10 stored frames {args.frame_size}px ({args.sampled_frames} sampled, "
        f"flip+crop), "
        f"ResNet18 width {width} x 2, batch {batch}; frame store {store}"
    )
    overrides = common.crema_overrides(dataset, "resnet18", width, batch, sampled_frames=args.sampled_frames)
    return "crema-d", overrides, description


def measure_case(case: str, args, workers: list[int], stores: list[str]) -> dict[str, list[list]]:
    runners = {}
    for store in case_stores(case, stores):
        recipe, overrides, description = case_settings(case, args, store)
        print(f"\n== {description}", flush=True)
        base = [*overrides, "strategy.name=heuristic", f"train.device={args.device}"]
        for w in workers:
            runners[(store, w)] = common.EpochRunner(common.load(recipe, [*base, f"data.num_workers={w}"]))
    return measure(case, runners, args.batches, args.model_steps, args.repeats)


def measure(case: str, runners: dict, batches: int, model_steps: int, repeats: int) -> dict[str, list[list]]:
    """Loader and model rates of ``runners`` (EpochRunners keyed by (frame store, loader worker count), all of one
    dataset shape and device), interleaved; then, untimed, bytes per sample, memory and the loader's breakdown per
    stage. The rows of each table, by table."""
    import torch

    from dmgl_cli.device import autocast as _autocast
    from dmgl_cli.device import to_device as _to_device
    from dmgl_cli.losses import total_loss
    from dmgl_cli.train import compute_losses

    keys = list(runners)
    model_runner = runners[keys[0]]
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

    def loader_epoch(key) -> float:
        """Samples/s of ``batches`` batches of a fresh epoch of ``key``'s training loader."""
        loader = runners[key].trainer.train_loader
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

    def name(key) -> str:
        store, w = key
        return f"loader, {w} workers" + ("" if store == "-" else f", {store}")

    calls = {"model": model_rate}
    calls.update({name(key): (lambda key=key: loader_epoch(key)) for key in keys})
    rates = common.interleave(calls, repeats, warmup=1)
    model = common.median(rates["model"])
    rows = [[case, "-", "model (training step)", model, "", "", ""]]
    for key in keys:
        ratios = common.paired_ratios(rates[name(key)], rates["model"])
        rows.append(
            [
                case,
                key[0],
                f"loader, {key[1]} workers",
                common.median(rates[name(key)]),
                common.median(ratios),
                common.spread(ratios),
                f">= {TARGET:g} {common.verdict(common.median(ratios), TARGET, False)}",
            ]
        )

    # Memory, untimed: one more epoch per configuration with only its own loader's workers alive.
    for key in keys:
        stop_workers(runners[key].trainer.train_loader)
    memory = []
    for key in keys:
        before_rss, before_pss = common.tree_memory(os.getpid())
        with common.MemoryWatch(interval=0.02) as watch:
            loader_epoch(key)
        stop_workers(runners[key].trainer.train_loader)
        memory.append(
            [
                case,
                key[0],
                key[1],
                common.gigabytes(before_rss),
                common.gigabytes(watch.peak_rss),
                common.gigabytes(watch.peak_pss),
                common.gigabytes(watch.peak_pss - before_pss),
            ]
        )

    stores = list(dict.fromkeys(store for store, _ in keys))
    first = {store: runners[next(k for k in keys if k[0] == store)] for store in stores}
    moved = [bytes_per_sample(case, store, first[store].trainer, batches) for store in stores]
    parts = [
        row
        for store in stores
        for row in loader_parts(case, store, first[store].trainer.splits.train, batch_size, repeats)
    ]
    return {"rates": rows, "bytes": moved, "memory": memory, "parts": parts}


def stop_workers(loader) -> None:
    """Shut down a loader's persistent worker processes (the next epoch starts fresh ones)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def counted_inputs(arrays: dict) -> tuple[dict, list]:
    """Copies of the split's input arrays whose reads are counted: memory maps wrapped in a CountingArray; a JPEG
    store (data/frames.py's JpegFrames) with its compressed data and frame offsets wrapped. The counters too."""
    wrapped, counters = {}, []
    for name, array in arrays.items():
        if hasattr(array, "read_frames"):
            store = copy.copy(array)
            store.data, store.offsets = common.CountingArray(array.data), common.CountingArray(array.offsets)
            wrapped[name] = store
            counters += [(name, store.data), (name, store.offsets)]
        else:
            wrapped[name] = common.CountingArray(array)
            counters.append((name, wrapped[name]))
    return wrapped, counters


def bytes_per_sample(case: str, store: str, trainer, batches: int) -> list:
    """Bytes per sample read from the store by the training loader's gather (over ``batches`` batches of one
    epoch, in this process) against the bytes of the batch's input tensors, which the model consumes; and what the
    former full gather (every stored frame) read for the same batches."""
    import numpy as np

    from dmgl_cli.data.loader import ArraySplit, gather_rows
    from dmgl_cli.data.prepared import SplitArrays

    split = trainer.splits.train
    frames = set(split.transform.frames) if split.transform is not None else set()
    sampler = trainer.train_loader.batch_sampler
    sampler.set_epoch(0)
    now, now_counters = counted_inputs(split.arrays.inputs)
    before, before_counters = counted_inputs(split.arrays.inputs)
    counted = ArraySplit(SplitArrays(split.arrays.labels, now), split.indices, split.transform)
    samples = consumed = consumed_frames = 0
    for number, positions in enumerate(sampler):
        batch = counted.__getitems__(positions)
        samples += len(positions)
        for name, tensor in batch["inputs"].items():
            size = tensor.numel() * tensor.element_size()
            consumed += size
            consumed_frames += size if name in frames else 0
        rows = split.indices[np.asarray(positions, dtype=np.int64)]
        for array in before.values():  # the former path: every stored frame of every sample
            gather_rows(array, rows)
        if number + 1 >= batches:
            break
    read = sum(c.bytes_read for _, c in now_counters)
    read_frames = sum(c.bytes_read for name, c in now_counters if name in frames)
    full = sum(c.bytes_read for _, c in before_counters)
    kb = 1000 * samples
    return [
        case,
        store,
        read / kb,
        read_frames / kb if frames else "-",
        consumed / kb,
        consumed_frames / kb if frames else "-",
        read / consumed,
        full / kb,
    ]


def loader_parts(case: str, store: str, split, batch_size: int, repeats: int) -> list[list]:
    """Milliseconds per sample of each stage of the training loader (in this process, no workers), cumulative."""
    import numpy as np
    import torch

    from dmgl_cli.data.loader import ArraySplit, gather_rows
    from dmgl_cli.data.transforms import BatchTransform

    transform = split.transform
    positions = list(range(min(batch_size, len(split))))
    rows = split.indices[np.asarray(positions)]
    arrays = split.arrays.inputs

    def full_gather():  # the loader before the frame-only gather: every stored frame (decoded), then sampling
        inputs = {name: torch.from_numpy(gather_rows(array, rows)) for name, array in arrays.items()}
        return frames_only(inputs, rows) if transform is not None else inputs

    def gather_with(chosen) -> ArraySplit:
        return ArraySplit(split.arrays, split.indices, chosen)

    frames_only = None
    stages = {}
    if transform is None:
        stages["gather (memory-mapped arrays -> batch)"] = lambda: gather_with(None).__getitems__(positions)
    else:
        frames_only = BatchTransform(transform.frames, {}, transform.crop_scale, transform.seed, True)
        stages["gather as before: all stored frames, then frame sampling"] = full_gather
        stages["gather, sampled frames only"] = lambda: gather_with(frames_only).__getitems__(positions)
        flips = {m: "flip" for m, mode in transform.augmentations.items() if "flip" in mode}
        if flips:
            flip = BatchTransform(transform.frames, flips, transform.crop_scale, transform.seed, True)
            stages["  + flip"] = lambda: gather_with(flip).__getitems__(positions)
        stages["  + crop: all training transforms"] = lambda: gather_with(transform).__getitems__(positions)
    times = common.interleave(
        {k: (lambda f=f: common.timed(f)) for k, f in stages.items()}, repeats + 1, warmup=1, progress=False
    )
    return [[case, store, stage, 1000 * min(values) / len(positions)] for stage, values in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        default="synthetic,crema-tiny,crema-resnet18",
        help="comma-separated: synthetic, crema-tiny, crema-resnet18",
    )
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts for the loader")
    parser.add_argument("--frame-size", type=int, default=112, help="stored frame side (CREMA-D: 224)")
    parser.add_argument(
        "--frame-stores",
        default="raw,jpeg",
        help="comma-separated frame stores of the CREMA-D-shaped cases: raw (uint8 arrays), jpeg (decoded per batch)",
    )
    parser.add_argument("--sampled-frames", type=int, default=3, help="frames sampled per sample (CREMA-D: 1-3)")
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
    stores = [s.strip() for s in args.frame_stores.split(",") if s.strip()]
    unknown = sorted(set(stores) - set(FRAME_STORES))
    if unknown or not stores:
        parser.error(f"--frame-stores: {', '.join(unknown) or 'none given'}; choose from {', '.join(FRAME_STORES)}")
    print(f"dataloader: {common.machine_line()}")
    print(f"note: {common.INTERLEAVE_NOTE}")
    tables: dict[str, list[list]] = {"rates": [], "bytes": [], "memory": [], "parts": []}
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        for table, rows in measure_case(case, args, workers, stores).items():
            tables[table] += rows
    common.print_table(
        ["case", "store", "what", "samples/s", "loader / model", "per-round range", "target"],
        tables["rates"],
        f"Loader samples/s / model samples/s (target >= {TARGET:g}), device {args.device}",
    )
    common.print_table(
        [
            "case",
            "store",
            "read kB/sample",
            "of it frames",
            "model input kB/sample",
            "of it frames",
            "read / input",
            "full gather before kB/sample",
        ],
        tables["bytes"],
        "Bytes per sample the gather reads from the store / the batch's input tensors the model consumes (jpeg: "
        "compressed frames + offsets read, decoded frames in the input); the former gather read every stored frame",
    )
    common.print_table(
        ["case", "store", "workers", "RSS before GB", "peak RSS GB", "peak PSS GB", "PSS added GB"],
        tables["memory"],
        "Memory of this process and the loader's workers over one epoch (sampled every 20 ms; before: this process "
        "alone, which holds every configuration's model; PSS counts a shared page once)",
    )
    common.print_table(
        ["case", "store", "loader stage (cumulative)", "ms per sample"],
        tables["parts"],
        "Where the loader's time goes (one process, best of the repeats)",
    )


if __name__ == "__main__":
    main()
