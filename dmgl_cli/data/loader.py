"""Batches from prepared arrays: train / val / test loaders with seeded, resumable shuffling.

Batches are gathered by fancy-indexing the memory-mapped arrays (one read per modality per batch, no per-sample
Python work, no decoding), or, from the compact stores, by decoding just the batch's JPEG frames (data/frames.py)
or computing its spectrograms from 16-bit samples (data/pcm_audio.py). Shuffling depends only on (seed, epoch), like DistributedSampler, so a run resumed at
epoch e draws exactly the batches the uninterrupted run drew.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dmgl_cli.data.frames import JpegFrames
from dmgl_cli.data.pcm_audio import PcmSpectrograms
from dmgl_cli.data.prepared import PreparedDataset, SplitArrays, StoredArray
from dmgl_cli.data.splits import stratified_split
from dmgl_cli.errors import DmglError

Batch = dict[str, object]  # {"inputs": {modality: Tensor}, "labels": Tensor, "indices": Tensor}


def slice_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous slice of ``size`` items; sizes differ by at most one (data-
    parallel ranks each read one slice of a batch: :mod:`dmgl_cli.distributed`)."""
    return size * rank // world, size * (rank + 1) // world


class ArraySplit(Dataset):
    """A split (or a subset of one, through ``indices``) served a whole batch at a time."""

    def __init__(self, arrays: SplitArrays, indices: np.ndarray | None = None, transform=None):
        self.arrays = arrays
        self.indices = np.arange(len(arrays)) if indices is None else np.asarray(indices, dtype=np.int64)
        # Optional (inputs, rows) -> inputs batch transform (data/transforms.py); runs in the loader's workers.
        self.transform = transform
        # Data-parallel training: (rank, world). Each batch asked for is the global batch; this rank reads its
        # contiguous slice (:func:`slice_bounds`), transformed as that part of the whole batch.
        self.shard: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.arrays.labels[self.indices])

    def __getitems__(self, positions: list[int]) -> Batch:
        rows = self.indices[np.asarray(positions, dtype=np.int64)]
        arrays = self.arrays.inputs
        # Frame-sampled modalities: the frames are chosen first and only those are read. Under data parallelism they
        # (and the augmentations) are drawn for the whole batch's rows, then this rank's part is kept.
        frames, generator = (
            ({}, None)
            if self.transform is None
            else self.transform.draw_frames(rows, {name: arrays[name].shape[1] for name in self.transform.frames})
        )
        part = None
        if self.shard is not None:
            part = slice(*slice_bounds(len(rows), *self.shard))
            drawn, rows = len(rows), rows[part]
            frames = {name: chosen[part] for name, chosen in frames.items()}
        inputs = {
            name: torch.from_numpy(
                gather_frames(array, rows, frames[name].numpy()) if name in frames else gather_rows(array, rows)
            )
            for name, array in arrays.items()
        }
        labels = torch.from_numpy(np.asarray(self.arrays.labels[rows], dtype=np.int64))
        if self.transform is not None:
            inputs = (
                self.transform.augment(inputs, generator, owned=set(inputs))
                if part is None
                else self.transform.augment(inputs, generator, owned=set(inputs), part=(part, drawn))
            )
        batch: Batch = {"inputs": inputs, "labels": labels, "indices": torch.from_numpy(rows)}
        if part is not None:
            batch["batch_rows"] = drawn  # the global batch this slice is part of (distributed.gather_output)
        return batch

    def __getitem__(self, position: int) -> Batch:
        return self.__getitems__([position])


# Rows at least this large are copied one by one in file order (see gather_rows); smaller ones in one fancy index.
ROW_BY_ROW_BYTES = 1 << 16


def gather_rows(array: StoredArray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` as a contiguous array, copied once.

    Large rows (spectrograms, frames) are read in ascending row order, which is sequential on disk, and each is
    written straight to its place in the batch: sorting with one fancy index and restoring the order with a second
    would copy every byte twice (measured with bench/dataloader.py: ~3x slower for CREMA-D-sized rows). Small rows
    (vectors, token ids) go through one fancy index, which is cheaper than a Python loop over them.
    """
    if isinstance(array, JpegFrames):  # every stored frame of these samples, decoded
        return array.read_frames(rows, np.broadcast_to(np.arange(array.shape[1]), (len(rows), array.shape[1])))
    if isinstance(array, PcmSpectrograms):  # spectrograms computed from the stored samples
        return array.read_rows(rows)
    if array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)) < ROW_BY_ROW_BYTES:
        return np.ascontiguousarray(array[rows])
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    for position in np.argsort(rows, kind="stable"):
        out[position] = array[rows[position]]
    return out


def gather_frames(array: StoredArray, rows: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """``array[rows[b], frames[b]]`` for every b as one contiguous array: only the sampled frames are read.

    ``array`` holds [n, stored frames, ...] per sample; ``frames`` is [batch, wanted]. Large frames are copied one by
    one in file order (ascending row, then frame), straight to their place in the batch, as :func:`gather_rows`
    copies large rows; small ones go through one fancy index.
    """
    if isinstance(array, JpegFrames):  # the compressed frame store decodes just these frames
        return array.read_frames(rows, frames)
    frames = np.asarray(frames, dtype=np.int64)
    if array.dtype.itemsize * int(np.prod(array.shape[2:], dtype=np.int64)) < ROW_BY_ROW_BYTES:
        return np.ascontiguousarray(array[rows[:, None], frames])
    out = np.empty((len(rows), frames.shape[1], *array.shape[2:]), dtype=array.dtype)
    for position in np.argsort(rows, kind="stable"):
        row = rows[position]
        for slot in np.argsort(frames[position], kind="stable"):
            out[position, slot] = array[row, frames[position, slot]]
    return out


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of positions; a fresh permutation per epoch from (seed, epoch), or in order when not shuffling."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        batch_shard: tuple[int, int] | None = None,
    ):
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        # Never drop the only batch: a tiny dataset still trains.
        self.drop_last = drop_last and size > batch_size
        self.epoch = 0
        self.skip = 0  # batches of this epoch to leave out (resuming in the middle of an epoch)
        # (rank, world) of a sharded evaluation: this rank yields batches rank, rank + world, ... (whole batches)
        self.batch_shard = batch_shard

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        stop = self.size - self.size % self.batch_size if self.drop_last else self.size
        rank, world = self.batch_shard or (0, 1)
        for number, start in enumerate(range(self.skip * self.batch_size, stop, self.batch_size)):
            if number % world == rank:
                yield order[start : start + self.batch_size]

    def __len__(self) -> int:
        total = self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)
        if self.batch_shard is None:
            return total
        rank, world = self.batch_shard
        return len(range(rank, total, world))


def _whole_batch(batch: Batch) -> Batch:
    return batch


@dataclass
class Splits:
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    val_source: str  # "dataset" or "carved from train (fraction f, split seed s)"


def make_splits(dataset: PreparedDataset, val_fraction: float, split_seed: int) -> Splits:
    """The dataset's own validation split, or one carved from train (stratified, seeded) when it has none.

    The carved split depends on ``split_seed`` only, not on the training seed, so every seed of an experiment is
    selected on the same validation data and never on test.
    """
    train = dataset.split("train")
    test = ArraySplit(dataset.split("test"))
    if dataset.has_split("val"):
        return Splits(ArraySplit(train), ArraySplit(dataset.split("val")), test, "dataset")
    kept, held_out = stratified_split(np.asarray(train.labels), val_fraction, split_seed)
    source = f"carved from train (fraction {val_fraction}, split seed {split_seed})"
    return Splits(ArraySplit(train, kept), ArraySplit(train, held_out), test, source)


def make_loader(
    split: ArraySplit,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent: bool = False,
    batch_shard: tuple[int, int] | None = None,
) -> DataLoader:
    """``persistent`` keeps the worker processes between epochs (the training loader); evaluation loaders, used
    once per epoch, start theirs on demand so a run does not hold three sets of workers. ``batch_shard``:
    (rank, world) of a sharded evaluation, this rank reading whole batches rank, rank + world, ..."""
    sampler = EpochBatchSampler(len(split), batch_size, shuffle, seed, drop_last, batch_shard)
    return DataLoader(
        split,
        batch_sampler=sampler,
        # torch types collate_fn as taking a list of samples; with __getitems__ it gets the dataset's whole batch.
        collate_fn=_whole_batch,  # pyright: ignore[reportArgumentType]
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and num_workers > 0,
        # Worker RNG (used by augmentations) is derived from the loader's seeded generator: reproducible.
        generator=torch.Generator().manual_seed(seed),
    )


def sample_batch(split: ArraySplit, batch_size: int, seed: int) -> Batch:
    """A random batch drawn from (seed) alone — the LB strategy's outer batches, so resume stays exact (this rank's
    slice of it under data parallelism, ``split.shard``)."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(split))
    positions = torch.randperm(len(split), generator=generator)[:size].tolist()
    return split.__getitems__(positions)


def hold_out(train: ArraySplit, holdout: int | float, seed: int, transform) -> tuple[ArraySplit, ArraySplit]:
    """Training samples set aside for the LB strategy's outer batches, and the training split without them.

    ``holdout`` is a fraction (stratified by class, as the validation split is carved) or a count (a seeded random
    draw, in the drawn order, as the authors' code takes its 16 samples); both depend on ``seed`` (data.split_seed)
    only, so every training seed steers alpha with the same samples.
    """
    if len(train) < 2:
        raise DmglError(
            f"strategy.lb.outer_data=holdout needs at least 2 training samples, the training split has "
            f"{len(train)}; prepare more samples or set strategy.lb.outer_data=val"
        )
    if isinstance(holdout, float):
        kept, chosen = stratified_split(np.asarray(train.labels), holdout, seed)
        if len(chosen) == 0:  # every class too small to give one: a seeded draw of the same fraction instead
            holdout = max(1, round(holdout * len(train)))
    if isinstance(holdout, int):
        if holdout >= len(train):
            raise DmglError(
                f"strategy.lb.holdout asks for {holdout} held-out samples but the training split has "
                f"only {len(train)}; lower strategy.lb.holdout"
            )
        chosen = np.random.default_rng(seed).permutation(len(train))[:holdout]
        kept = np.setdiff1d(np.arange(len(train)), chosen)
    return (
        ArraySplit(train.arrays, train.indices[kept], train.transform),
        ArraySplit(train.arrays, train.indices[chosen], transform),
    )


def eval_loader(
    dataset: PreparedDataset,
    config,
    split: str | ArraySplit,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    batch_shard: tuple[int, int] | None = None,
) -> DataLoader:
    """Batches of one split (``"train"``, ``"val"``, ``"test"``, or an :class:`ArraySplit` of ``dataset``) for
    scoring: the evaluation transform (no random augmentation), ``train.eval_batch_size``, a fixed order and no
    dropped samples, as the trainer scores its epochs, ``dmgl eval`` re-scores a checkpoint and methods read data
    beyond the batch. ``batch_shard``: (rank, world) when the ranks of a data-parallel run share the batches out."""
    from dmgl_cli.data.transforms import build_transforms

    chosen: ArraySplit = (
        getattr(make_splits(dataset, config.data.val_fraction, config.data.split_seed), split)
        if isinstance(split, str)
        else split
    )
    scored = ArraySplit(chosen.arrays, chosen.indices, build_transforms(dataset.modalities, config, training=False))
    batches = math.ceil(len(scored) / config.train.eval_batch_size)
    return make_loader(
        scored,
        config.train.eval_batch_size,
        shuffle=False,
        seed=0,
        drop_last=False,
        # Workers only help by reading the next batch while the model scores this one, so a split of B batches gets
        # at most B - 1: a one-batch split is read in this process, without forking workers at each scoring.
        num_workers=min(num_workers, max(batches - 1, 0)),
        pin_memory=pin_memory,
        batch_shard=batch_shard,
    )
