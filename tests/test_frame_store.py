"""The compact frame store: `frame_store=jpeg` keeps video frames as JPEG and decodes only the frames a batch uses;
it reads like the raw store, within JPEG's loss, and trains."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from PIL import Image
from rawgen import COLOURS, make_crema_d, write_video

from dmgl_cli.data.frames import JpegFrames, encode_frames, unpack_frames
from dmgl_cli.data.loader import ArraySplit, gather_frames
from dmgl_cli.data.media import even_indices, read_clip, rgb_converter
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.data.transforms import BatchTransform


def test_packed_frames_round_trip_within_jpeg_loss():
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8), 8, axis=1), 8, axis=2)
    packed = encode_frames(smooth, quality=95)
    offsets, data = unpack_frames(packed, 2)
    assert offsets[0] == 0 and offsets[-1] == len(data)
    assert bytes(data[:2]) == b"\xff\xd8"  # a JPEG file starts with SOI


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("quality", [90, 60])
def test_frames_are_encoded_as_pillow_encodes_them(channels, quality):
    # OpenCV encodes (faster); the files are the ones Pillow wrote before: same quality, same 4:2:0 chroma
    rng = np.random.default_rng(quality)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (2, 6, 5, channels), dtype=np.uint8), 8, axis=1), 8, axis=2)
    frames = np.clip(smooth.astype(int) + rng.integers(-9, 10, smooth.shape), 0, 255).astype(np.uint8)
    offsets, data = unpack_frames(encode_frames(frames, quality=quality), 2)
    for k, frame in enumerate(frames):
        buffer = io.BytesIO()
        Image.fromarray(frame[..., 0] if channels == 1 else frame).save(buffer, format="JPEG", quality=quality)
        assert bytes(data[offsets[k] : offsets[k + 1]]) == buffer.getvalue()


@pytest.mark.parametrize("name", ["clip.flv", "clip.mp4"])
def test_read_clip_spreads_the_frames_over_every_decoded_frame(tmp_path, name):
    # one opening of the file counts the frames from its packets and decodes from them: the frames kept are the
    # ones at even positions of a full decode, over the whole clip or a range of it
    path = write_video(tmp_path / name, 23, COLOURS[2], audio_seconds=1.0 if name.endswith("mp4") else None)
    convert = rgb_converter(16)
    with av.open(str(path)) as container:
        every = [convert(frame) for frame in container.decode(video=0)]
    assert len(every) == 23
    np.testing.assert_array_equal(read_clip(path, 5, 16), np.stack([every[i] for i in even_indices(23, 5)]))
    np.testing.assert_array_equal(
        read_clip(path, 4, 16, start=6, end=18), np.stack([every[i] for i in even_indices(12, 4, 6)])
    )


@pytest.fixture
def prepared_both(run_cli, registry, tmp_path):
    raw = tmp_path / "CREMA-D"
    make_crema_d(raw, per_class=2)
    for store in ("raw", "jpeg"):
        run_cli(
            "prepare", "crema-d", "--raw", raw, "--name", f"crema-{store}", "-o", "frame_size=48",
            "-o", f"frame_store={store}", "--silent",
        )  # fmt: skip
    return PreparedDataset(registry / "datasets" / "crema-raw"), PreparedDataset(registry / "datasets" / "crema-jpeg")


@pytest.mark.slow
def test_jpeg_store_reads_like_the_raw_store_and_only_decodes_sampled_frames(run_cli, prepared_both):
    raw, jpeg = prepared_both
    assert "storage" not in raw.modalities["visual"] and jpeg.modalities["visual"]["storage"] == "jpeg"
    raw_train, jpeg_train = raw.split("train"), jpeg.split("train")
    store = jpeg_train.inputs["visual"]
    assert isinstance(store, JpegFrames) and store.shape == raw_train.inputs["visual"].shape
    raw_bytes, jpeg_bytes = (sum(f.stat().st_size for f in (d.path / "train").glob("visual*")) for d in (raw, jpeg))
    assert jpeg_bytes < raw_bytes / 3
    # decoded frames are the raw ones within JPEG's loss (flat coloured test clips: a few levels)
    everything = np.asarray(store)
    difference = np.abs(everything.astype(int) - np.asarray(raw_train.inputs["visual"]).astype(int))
    assert difference.mean() < 3
    # the frame-only read decodes exactly the frames asked for, equal to those of a whole-sample decode
    rows, frames = np.array([3, 0, 7]), np.array([[0, 9], [4, 5], [2, 2]])
    np.testing.assert_array_equal(gather_frames(store, rows, frames), everything[rows[:, None], frames])
    np.testing.assert_array_equal(store[5], everything[5])
    np.testing.assert_array_equal(store[2:4, 1], everything[2:4, 1])
    # a training batch of sampled, augmented frames from the JPEG store
    transform = BatchTransform({"visual": 3}, {"visual": "flip_crop"}, 0.8, seed=1, training=True)
    batch = ArraySplit(jpeg_train, transform=transform).__getitems__([1, 6, 2])
    full = {"visual": torch.from_numpy(everything[[1, 6, 2]])}
    assert torch.equal(batch["inputs"]["visual"], transform(full, np.array([1, 6, 2]))["visual"])
    assert "all files match" in run_cli("datasets", "verify", "crema-jpeg").output
    trained = run_cli(
        "train", "--recipe", "crema-d", "--set", "dataset=crema-jpeg", "--epochs", "1", "--silent",
        "--set", "model.embed_dim=16", "--set", "train.batch_size=8", "--set", "model.encoders.audio.options.width=4",
        "--set", "model.encoders.visual.options.width=4", "--set", "train.device=cpu",
    )  # fmt: skip
    assert "test_acc" in trained.output


def test_frame_store_options_are_checked(run_cli, tmp_path):
    raw = tmp_path / "CREMA-D"
    make_crema_d(raw, per_class=1)
    bad = run_cli("prepare", "crema-d", "--raw", raw, "-o", "frame_store=png", expect=1)
    assert "frame_store='png' must be one of raw, jpeg" in bad.output
    bad = run_cli("prepare", "crema-d", "--raw", raw, "-o", "frame_quality=0", expect=1)
    assert "frame_quality=0 must be from 1 to 100" in bad.output
