"""Only the frames a batch uses are read: the frame-only gather gives the batch the full gather gave, and moves
no byte the model does not consume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmgl_cli.data.loader import ROW_BY_ROW_BYTES, ArraySplit, gather_frames, gather_rows
from dmgl_cli.data.prepared import SplitArrays
from dmgl_cli.data.transforms import BatchTransform

STORED = 10


class CountingArray:
    """A read-only array that counts the bytes its reads return (what a gather moves out of the memory map)."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.bytes_read = 0

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, key):
        value = np.asarray(self.array[key])
        self.bytes_read += value.nbytes
        return value


def _arrays(tmp_path, side: int) -> SplitArrays:
    rng = np.random.default_rng(3)
    np.save(tmp_path / "visual.npy", rng.integers(0, 256, (24, STORED, side, side, 3), dtype=np.uint8))
    np.save(tmp_path / "audio.npy", rng.standard_normal((24, 16, 12)).astype(np.float32))
    return SplitArrays(
        labels=np.arange(24, dtype=np.int64) % 3,
        inputs={
            "visual": np.load(tmp_path / "visual.npy", mmap_mode="r"),
            "audio": np.load(tmp_path / "audio.npy", mmap_mode="r"),
        },
    )


@pytest.mark.parametrize("side", [8, 160])  # one fancy index / frame by frame in file order
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("wanted", [1, 3])
def test_frame_only_gather_equals_the_full_gather_then_sampling(tmp_path, side, training, wanted):
    frame_bytes = side * side * 3
    assert (frame_bytes >= ROW_BY_ROW_BYTES) == (side == 160)
    arrays = _arrays(tmp_path, side)
    transform = BatchTransform({"visual": wanted}, {"visual": "flip_crop"}, 0.7, seed=11, training=training)
    split = ArraySplit(arrays, indices=np.arange(2, 22), transform=transform)
    positions = [13, 0, 7, 7, 19, 4]  # unsorted, with a repeat
    batch = split.__getitems__(positions)

    rows = split.indices[positions]
    full = {name: torch.from_numpy(gather_rows(array, rows)) for name, array in arrays.inputs.items()}
    expected = transform(full, rows)  # v0.1's path: every stored frame gathered, then sampled and augmented
    assert batch["inputs"]["visual"].shape == (len(positions), wanted, side, side, 3)
    for name in ("visual", "audio"):
        torch.testing.assert_close(batch["inputs"][name], expected[name], rtol=0, atol=0)
    assert torch.equal(batch["indices"], torch.from_numpy(rows))


@pytest.mark.parametrize("side", [8, 160])
def test_bytes_gathered_per_sample_equal_the_bytes_the_model_uses(tmp_path, side):
    arrays = _arrays(tmp_path, side)
    counted = CountingArray(np.asarray(arrays.inputs["visual"]))
    rows = np.array([5, 1, 17, 9])
    frames = np.array([[0, 4, 7], [1, 5, 8], [2, 3, 9], [0, 1, 2]])
    out = gather_frames(counted, rows, frames)  # pyright: ignore[reportArgumentType]
    np.testing.assert_array_equal(out, np.asarray(arrays.inputs["visual"])[rows[:, None], frames])
    assert counted.bytes_read == out.nbytes == len(rows) * 3 * side * side * 3
    # the full gather moved every stored frame
    full = CountingArray(np.asarray(arrays.inputs["visual"]))
    gather_rows(full, rows)  # pyright: ignore[reportArgumentType]
    assert full.bytes_read == len(rows) * STORED * side * side * 3


def test_frame_choice_depends_on_the_seed_and_the_rows_only(tmp_path):
    arrays = _arrays(tmp_path, 8)
    transform = BatchTransform({"visual": 2}, {}, 1.0, seed=4, training=True)
    split = ArraySplit(arrays, transform=transform)
    first = split.__getitems__([3, 8, 1])["inputs"]["visual"]
    split.__getitems__([0, 2])  # another batch in between changes nothing
    assert torch.equal(split.__getitems__([3, 8, 1])["inputs"]["visual"], first)
    other_seed = ArraySplit(arrays, transform=BatchTransform({"visual": 2}, {}, 1.0, seed=5, training=True))
    assert not torch.equal(other_seed.__getitems__([3, 8, 1])["inputs"]["visual"], first)
