"""The compact frame store: video frames kept as JPEG, decoded only when a batch uses them.

A modality prepared with ``frame_store=jpeg`` is stored, per split, as

    <split>/<modality>.jpeg          every frame's JPEG bytes, sample after sample, frame after frame
    <split>/<modality>.offsets.npy   int64 [n, frames + 1]: where each frame starts in the .jpeg file; the last
                                     column is where the sample's last frame ends

and read through :class:`JpegFrames`, which looks like the [n, frames, H, W, C] uint8 array the raw store holds:
``read_frames(rows, frames)`` decodes just the sampled frames of a batch; indexing decodes whole samples. JPEG
holds 1 (grey) or 3 (RGB) channels, so only such frames can use it. Frames are encoded in the preparer's worker
processes with OpenCV (the same bytes as Pillow's encoder, faster) and decoded in the loader's with Pillow (both
libjpeg-turbo): ~0.4 ms a 224-px frame on one CPU core, within 30% of ``torchvision.io.decode_jpeg`` on a batch,
which torchvision 0.29 deprecates.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from dmgl_cli.data.decoded_rows import DecodedRows

FRAME_STORES = ("raw", "jpeg")
JPEG_CHANNELS = (1, 3)


def encode_frames(frames: np.ndarray, quality: int) -> np.ndarray:
    """One sample's frames [T, H, W, C] uint8 as one packed uint8 array: T+1 int64 offsets (relative to the end of
    the header), then the T JPEG files.

    Encoded with OpenCV, which writes the same bytes as Pillow's encoder at the same quality (both libjpeg-turbo,
    baseline, 4:2:0 chroma; tests/test_frame_store.py compares them) in ~60% of its time."""
    import cv2

    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        int(quality),
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
    ]
    encoded = []
    for frame in frames:
        # OpenCV takes colour pixels as BGR: swapped so the file holds the RGB frame (cvtColor: 3x faster than a
        # numpy copy of frame[..., ::-1])
        image = frame[..., 0] if frame.shape[-1] == 1 else cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        ok, data = cv2.imencode(".jpg", image, params)
        if not ok:
            raise ValueError(f"OpenCV could not encode a frame of shape {frame.shape} as JPEG")
        encoded.append(data.reshape(-1))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    return np.concatenate([np.frombuffer(offsets.tobytes(), dtype=np.uint8), *encoded])


def unpack_frames(packed: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [frames + 1] relative to the data, the JPEG data) of one packed sample."""
    header = (frames + 1) * 8
    offsets = np.frombuffer(np.ascontiguousarray(packed[:header]).tobytes(), dtype=np.int64)
    return offsets, packed[header:]


class JpegEncodingDecode:
    """Wraps a preparer's ``decode(source) -> {key: array}`` so that the modalities in ``jpeg`` come back JPEG-encoded
    (packed by :func:`encode_frames`); picklable, so the encoding runs in the decoding worker processes."""

    def __init__(self, decode, jpeg: dict[str, int]):
        self.decode, self.jpeg = decode, dict(jpeg)  # key -> quality

    def __call__(self, source: Any) -> dict[str, np.ndarray]:
        result = dict(self.decode(source))
        for key, quality in self.jpeg.items():
            result[key] = encode_frames(np.asarray(result[key]), quality)
        return result


class JpegFrames(DecodedRows):
    """A JPEG-stored frame modality of one split, read like the raw [n, T, H, W, C] uint8 array."""

    def __init__(self, folder: Path, key: str, shape: tuple[int, ...]):
        self.offsets = np.load(folder / f"{key}.offsets.npy", mmap_mode="r")
        blob = folder / f"{key}.jpeg"
        # an empty split has an empty file, which cannot be memory-mapped
        self.data = np.memmap(blob, dtype=np.uint8, mode="r") if blob.stat().st_size else np.zeros(0, np.uint8)
        self.shape = (int(self.offsets.shape[0]), *shape)
        self.dtype = np.dtype(np.uint8)
        if self.offsets.shape[1] != shape[0] + 1:
            raise ValueError(f"{folder / key}.offsets.npy has {self.offsets.shape[1] - 1} frames, expected {shape[0]}")

    @property
    def nbytes(self) -> int:
        """Bytes on disk (the compressed frames and their offsets)."""
        return int(self.data.nbytes + self.offsets.nbytes)

    def read_frames(self, rows: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """``frames[b]`` of sample ``rows[b]`` for every b, decoded: [batch, wanted, H, W, C] uint8. Only these
        frames' bytes are read (in file order) and decoded, each straight into its place in the batch."""
        from PIL import Image

        rows = np.asarray(rows, dtype=np.int64)
        frames = np.asarray(frames, dtype=np.int64)
        starts = self.offsets[rows[:, None], frames].reshape(-1)
        ends = self.offsets[rows[:, None], frames + 1].reshape(-1)
        out = np.empty((len(rows), frames.shape[1], *self.shape[2:]), dtype=np.uint8)
        flat = out.reshape(-1, *self.shape[2:])
        mode = "L" if self.shape[-1] == 1 else "RGB"
        for index in np.argsort(starts, kind="stable"):
            with Image.open(io.BytesIO(self.data[starts[index] : ends[index]].tobytes())) as image:
                pixels = np.asarray(image.convert(mode) if image.mode != mode else image)
            flat[index] = pixels.reshape(flat.shape[1:])
        return out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Whole samples ``rows``, every frame decoded."""
        return self.read_frames(rows, np.broadcast_to(np.arange(self.shape[1]), (len(rows), self.shape[1])))


def write_store(folder: Path, key: str, packed_samples, frames: int) -> None:
    """Concatenate packed samples (see :func:`encode_frames`), in order, into ``<key>.jpeg`` and its offsets."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{key}.jpeg.part"
    rows = []
    position = 0
    with open(partial, "wb") as handle:
        for packed in packed_samples:
            offsets, data = unpack_frames(packed, frames)
            handle.write(np.ascontiguousarray(data).tobytes())
            rows.append(offsets + position)
            position += int(offsets[-1])
    offsets = folder / f"{key}.offsets.npy"
    with open(offsets.with_name(offsets.name + ".part"), "wb") as handle:
        np.save(handle, np.array(rows, dtype=np.int64).reshape(len(rows), frames + 1))
    offsets.with_name(offsets.name + ".part").replace(offsets)
    partial.replace(folder / f"{key}.jpeg")
