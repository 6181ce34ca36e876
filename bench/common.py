"""Shared helpers of the performance benchmarks: a private registry, CREMA-D-shaped prepared sets, an in-memory
run sink, interleaved timing and table printing.

Every benchmark reports *ratios measured in one process*, with the compared variants interleaved (A B A B ...),
because the machines they run on are shared and noisy: a slow minute slows every variant alike. Absolute figures
are printed too, but only the ratios are compared with targets.
"""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

INTERLEAVE_NOTE = (
    "ratios are medians over repeats of variants run interleaved (A B A B ...) in this one process, "
    "so that load from other processes hits every variant alike"
)

# CREMA-D as the crema-d preparer stores it: audio log-spectrogram [257, 299] (3 s at 16 kHz), 10 uint8 frames
# (3 of them are sampled at train time by the recipe's data.options.frames), 6 classes.
CREMA_AUDIO_SHAPE = (257, 299)
CREMA_STORED_FRAMES = 10
CREMA_FRAME_SIZE = 224
CREMA_CLASSES = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
# The "tiny" ResNet18: every layer 1/4 as wide. Not 8: torch 2.14's CPU convolution (oneDNN) crashes in the backward
# of ResNet18's first 1x1 stride-2 downsample with 8 input channels on channels-last frames of 224 px.
TINY_WIDTH = 16


def use_private_registry(prefix: str = "dmgl-bench-") -> Path:
    """DMGL_HOME as given (kept, so generated datasets are re-used), or a fresh temporary registry removed at exit,
    so that a benchmark never touches the user's runs."""
    home = os.environ.get("DMGL_HOME")
    if not home:
        home = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["DMGL_HOME"] = home
    return Path(home)


def kept_registry_with_synthetic() -> tuple[Path, list[str]]:
    """For the accuracy benches: DMGL_HOME or a new temporary registry that is kept (its runs can be browsed with
    `dmgl ui` afterwards), with the synthetic dataset prepared once; returns it and the dataset's modalities."""
    home = Path(os.environ.get("DMGL_HOME") or tempfile.mkdtemp(prefix="dmgl-bench-"))
    os.environ["DMGL_HOME"] = str(home)
    from dmgl_cli.data.registry import DatasetRegistry, open_dataset
    from dmgl_cli.prepare import prepare_dataset

    if "synthetic" not in {row["name"] for row in DatasetRegistry().rows()}:
        prepare_dataset("synthetic")
    return home, list(open_dataset("synthetic").modalities)


def seed_cell(summary: dict[str, float], key: str) -> str:
    """``mean±std`` of ``key`` over seeds (a training summary), or ``-`` when the row has no such score."""
    if f"{key}_mean" not in summary:
        return f"{'-':>16}"
    return f"{summary[key + '_mean']:>9.4f}±{summary[key + '_std']:.4f}"


def train_seeds(config, seeds: int, run_name: str) -> tuple[dict[str, float], float]:
    """Train ``config`` over seeds 0..seeds-1 through run.training (one parent run); (summary, seconds)."""
    from dmgl_cli.run import training
    from dmgl_cli.tracking import Tracker

    started = time.perf_counter()
    outcome = training.train(config, list(range(seeds)), tracker=Tracker(), run_name=run_name)
    return outcome.summary, time.perf_counter() - started


def accuracy_line(
    label: str, summary: dict[str, float], modalities: list[str], width: int = 22, gap: bool = True
) -> str:
    """``label``, fused and per-modality test ACC (and the gap) as ``mean±std`` cells, for the accuracy tables."""
    line = f"{label:<{width}} {seed_cell(summary, 'test_acc')} "
    line += " ".join(seed_cell(summary, f"test_acc_{m}") for m in modalities)
    return line + (f" {seed_cell(summary, 'test_gap_acc')}" if gap else "")


def accuracy_table(
    recipe: str,
    rows: list[tuple[str, list[str]]],
    overrides: list[str],
    seeds: int,
    modalities: list[str],
    run_prefix: str,
    gap: bool = True,
    per_run: bool = False,
) -> list[str]:
    """Train every (label, settings) row of ``recipe`` over ``seeds`` seeds, printing each row's accuracy line as it
    finishes and then the whole table; returns its lines. The last column is seconds per row, or per run."""
    from dmgl_cli.config import load_config

    header = f"{'strategy':<22} {'multimodal ACC':>16} " + " ".join(f"{m + ' ACC':>16}" for m in modalities)
    header += (f" {'gap':>16}" if gap else "") + (f" {'s/run':>8}" if per_run else f" {'seconds':>8}")
    lines = [header, "-" * len(header)]
    print(header, flush=True)
    for label, settings in rows:
        config = load_config(recipe, settings + overrides)
        summary, seconds = train_seeds(config, seeds, f"{run_prefix}-{label.split()[0]}")
        line = f"{accuracy_line(label, summary, modalities, gap=gap)} {seconds / (seeds if per_run else 1):>8.1f}"
        lines.append(line)
        print(line, flush=True)
    print()
    print("\n".join(lines))
    return lines


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_line() -> str:
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {cuda}, "
        f"load average {load:.1f}"
    )


# ------------------------------------------------------------------------------------------------ datasets


def ensure_synthetic(samples: int | None = None) -> str:
    """The built-in synthetic dataset, prepared once per registry."""
    from dmgl_cli.data.registry import DatasetRegistry
    from dmgl_cli.prepare import prepare_dataset

    name = "synthetic" if samples is None else f"synthetic-{samples}"
    if name not in {r["name"] for r in DatasetRegistry().rows()}:
        prepare_dataset("synthetic", name=name, options=None if samples is None else {"samples": samples})
    return name


def write_crema_shaped(
    name: str,
    train: int,
    test: int,
    *,
    frames: int = CREMA_STORED_FRAMES,
    frame_size: int = CREMA_FRAME_SIZE,
    audio_shape: tuple[int, int] = CREMA_AUDIO_SHAPE,
    audio_dtype: str = "float32",
    seed: int = 0,
    frame_store: str = "raw",
) -> str:
    """A registered prepared dataset ``name`` with CREMA-D's modalities and shapes (see
    :func:`write_crema_shaped_at`); re-used if already registered."""
    from dmgl_cli.data.registry import DatasetRegistry
    from dmgl_cli.paths import datasets_dir, ensure_registry

    registry = DatasetRegistry()
    if name in {r["name"] for r in registry.rows()}:
        return name
    destination = datasets_dir(ensure_registry()) / name
    manifest = write_crema_shaped_at(
        destination,
        name,
        train,
        test,
        frames=frames,
        frame_size=frame_size,
        audio_shape=audio_shape,
        audio_dtype=audio_dtype,
        seed=seed,
        frame_store=frame_store,
    )
    registry.register(manifest, destination)
    return name


def write_crema_shaped_at(
    destination: Path,
    name: str,
    train: int,
    test: int,
    *,
    frames: int = CREMA_STORED_FRAMES,
    frame_size: int = CREMA_FRAME_SIZE,
    audio_shape: tuple[int, int] = CREMA_AUDIO_SHAPE,
    audio_dtype: str = "float32",
    seed: int = 0,
    frame_store: str = "raw",
) -> dict[str, Any]:
    """Write a prepared dataset with CREMA-D's modalities and shapes (random content with a weak class signal, so
    the losses move as in training) at ``destination`` with the real PreparedWriter; returns its manifest. Needs no
    registry (and so neither sqlite-utils nor MLflow): the GPU check uses it on a bare machine. ``frame_store="jpeg"``
    stores the frames as the preparers' ``frame_store=jpeg`` does (quality 90)."""
    from dmgl_cli.data.frames import encode_frames, write_store
    from dmgl_cli.data.prepared import PreparedWriter

    destination.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    audio_means = rng.standard_normal((len(CREMA_CLASSES), audio_shape[0], 1)).astype(np.float32)
    chunk = 64
    with PreparedWriter(destination) as writer:
        for split, count in (("train", train), ("test", test)):
            labels = rng.integers(0, len(CREMA_CLASSES), count).astype(np.int64)
            writer.put(split, "labels", labels)
            audio = writer.array(split, "audio", (count, *audio_shape), audio_dtype)
            raw = frame_store == "raw"
            visual = (
                writer.array(split, "visual", (count, frames, frame_size, frame_size, 3), np.uint8) if raw else None
            )
            packed = []
            for start in range(0, count, chunk):
                part = labels[start : start + chunk]
                noise = rng.standard_normal((len(part), *audio_shape), dtype=np.float32)
                audio[start : start + len(part)] = (noise + 0.5 * audio_means[part]).astype(audio_dtype)
                images = _frames(rng, part, frames, frame_size)
                if visual is not None:
                    visual[start : start + len(part)] = images
                else:
                    packed += [encode_frames(sample, 90) for sample in images]
            if not raw:
                write_store(writer.work_dir / split, "visual", packed, frames)
        return writer.finish(
            name=name,
            classes=CREMA_CLASSES,
            modalities={
                "audio": {"kind": "audio", "dtype": audio_dtype, "shape": list(audio_shape)},
                "visual": {
                    "kind": "video",
                    "dtype": "uint8",
                    "shape": [frames, frame_size, frame_size, 3],
                    "storage": frame_store,
                },
            },
            preparer="bench-crema-shaped",
            preparer_version="1",
            extra={"note": "random CREMA-D-shaped data written by bench/common.py"},
        )


def _frames(rng: np.random.Generator, labels: np.ndarray, frames: int, size: int) -> np.ndarray:
    """Frames with some spatial structure (8x8-pixel blocks plus fine noise), so that they compress and decode as
    JPEG roughly like video frames do rather than like white noise; the red channel carries the class."""
    block = 8
    coarse = rng.integers(0, 200, (len(labels), frames, -(-size // block), -(-size // block), 3), dtype=np.uint8)
    images = coarse.repeat(block, axis=2).repeat(block, axis=3)[:, :, :size, :size]
    images = images + rng.integers(0, 24, images.shape, dtype=np.uint8)
    images[..., 0] = images[..., 0] // 2 + (20 * labels[:, None, None, None]).astype(np.uint8)
    return images


def crema_overrides(
    dataset: str, encoder: str, width: int, batch_size: int, sampled_frames: int = 3, augment: str = "flip_crop"
) -> list[str]:
    """The crema-d recipe's settings pointed at ``dataset``, with the encoder and batch size of the benchmark."""
    return [
        f"dataset={dataset}",
        f"train.batch_size={batch_size}",
        f"train.eval_batch_size={batch_size}",
        "data.num_workers=0",
        f"data.options.frames.visual={sampled_frames}",
        f"data.options.augment.visual={augment}",
        f"model.encoders.audio.name={encoder}",
        f"model.encoders.visual.name={encoder}",
        f"model.encoders.audio.options.width={width}",
        f"model.encoders.visual.options.width={width}",
        f"model.embed_dim={width * 8}",
    ]


def open_dataset(name: str):
    from dmgl_cli.data.registry import open_dataset as registered

    return registered(name)


# ------------------------------------------------------------------------------------------------ training


@dataclass
class MemorySink:
    """A RunSink that keeps metrics in memory and checkpoints by reference (no disk, no MLflow): timing only."""

    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> None:
        self.checkpoints[name] = state


def _with_epochs(config, epochs: int):
    import dataclasses

    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs, test_curves=False))


class EpochRunner:
    """A Trainer advanced one epoch at a time through its public ``fit`` (``train.epochs`` raised by one per call),
    so that several configurations can be interleaved epoch by epoch. Returns the trainer's own per-epoch metrics
    (``epoch_seconds``, ``train_samples_per_s``) — the figures every run logs to MLflow."""

    def __init__(self, config, seed: int = 0, dataset=None, eval_workers: int | None = None):
        from dmgl_cli.data.loader import make_loader
        from dmgl_cli.train import Trainer

        self.config = _with_epochs(config, 0)
        self.sink = MemorySink()
        # dataset: a PreparedDataset, or None to find config.dataset in the registry
        self.trainer = Trainer(self.config, dataset or open_dataset(config.dataset), seed, self.sink)
        if eval_workers is not None:  # evaluation is not timed: fewer idle worker processes
            trainer = self.trainer
            trainer.eval_loaders = {
                name: make_loader(
                    loader.dataset,
                    config.train.eval_batch_size,
                    shuffle=False,
                    seed=seed,
                    drop_last=False,
                    num_workers=eval_workers,
                    pin_memory=trainer.device.type == "cuda",
                )
                for name, loader in trainer.eval_loaders.items()
            }

    @property
    def samples_per_epoch(self) -> int:
        return len(self.trainer.train_loader) * self.config.train.batch_size

    def epoch(self) -> dict[str, float]:
        # The config is frozen: the trainer (and its method) get a copy with one more epoch.
        self.config = _with_epochs(self.config, self.config.train.epochs + 1)
        self.trainer.config = self.trainer.method.config = self.config
        self.trainer.fit()
        return self.trainer.history[-1]


def load(recipe: str, overrides: list[str]):
    from dmgl_cli.config import load_config

    return load_config(recipe, overrides)


# ------------------------------------------------------------------------------------------------- memory


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (DataLoader workers), from /proc."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    queue += [int(child) for child in handle.read().split()]
        except OSError:
            continue
    return found


def tree_memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in bytes of ``pid`` and its descendants, from /proc/<pid>/smaps_rollup. PSS shares each page among
    the processes that map it (a worker's copy-on-write pages and a memory map's page cache count once in all),
    which is what summing RSS over processes overstates."""
    rss = pss = 0.0
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


class MemoryWatch:
    """Peak RSS and PSS of a process tree (default: this one), sampled every ``interval`` seconds in a thread while
    the ``with`` block runs; ``peak_rss`` / ``peak_pss`` in bytes afterwards."""

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        import threading

        self.pid, self.interval = pid or os.getpid(), interval
        self.peak_rss = self.peak_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            rss, pss = tree_memory(self.pid)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        rss, pss = tree_memory(self.pid)  # the state at the end counts too
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)


def gigabytes(value: float) -> float:
    return value / 2**30


# ------------------------------------------------------------------------------------------------- timing


def interleave(
    variants: dict[str, Callable[[], float]], repeats: int, warmup: int = 1, progress: bool = True
) -> dict[str, list[float]]:
    """Call every variant in turn (A B C A B C ...) ``warmup`` times unrecorded, then ``repeats`` times recorded;
    each call returns the figure it measured (seconds, or a rate)."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    for round_number in range(warmup + repeats):
        for name, call in variants.items():
            value = call()
            if round_number >= warmup:
                results[name].append(value)
            if progress:
                tag = "warm-up" if round_number < warmup else f"repeat {round_number - warmup + 1}/{repeats}"
                print(f"  [{tag}] {name}: {value:.4g}", file=sys.stderr, flush=True)
    return results


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Ratios of the values measured in the same round (neighbours in time)."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f"[{min(values):.3g}-{max(values):.3g}]"


def timed(call: Callable[[], Any], sync: bool = False) -> float:
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    call()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def verdict(value: float, target: float, at_most: bool) -> str:
    if value != value:  # NaN
        return "n/a"
    ok = value <= target if at_most else value >= target
    return "meets" if ok else "MISSES"


def print_table(headers: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# ------------------------------------------------------------------------------------------------- bytes


class CountingArray:
    """A read-only array proxy that counts the bytes its reads return (what a gather moves out of a memory map), as
    tests/test_frame_gather.py's does."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.bytes_read = 0

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, key):
        value = np.asarray(self.array[key])
        self.bytes_read += value.nbytes
        return value


def directory_bytes(path: Path, prefix: str = "") -> int:
    """Bytes of the files under ``path`` whose name starts with ``prefix`` (all files by default)."""
    return sum(p.stat().st_size for p in Path(path).rglob(f"{prefix}*") if p.is_file())
