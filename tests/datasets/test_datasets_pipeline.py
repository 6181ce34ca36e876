"""The shared pieces under the dataset preparers: the resumable driver, batch transforms, encoders."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rawgen import decode_logged
from torchvision.models import resnet18
from torchvision.models.video import r3d_18

from dmgl_cli.config import Config, EncoderConfig
from dmgl_cli.data.loader import ArraySplit
from dmgl_cli.data.prepared import PreparedDataset, SplitArrays
from dmgl_cli.data.preparers import driver
from dmgl_cli.data.preparers.base import PrepareJob
from dmgl_cli.data.transforms import build_transforms, frame_positions
from dmgl_cli.errors import DmglError
from dmgl_cli.models.encoders import ENCODERS

# ------------------------------------------------------------------------------------------------------ driver


def make_plan(tmp_path: Path) -> driver.Plan:
    samples = [
        driver.Sample("train" if i < 6 else "test", i if i < 6 else i - 6, i % 2, f"s{i}", (i, f"file{i}"))
        for i in range(8)
    ]
    decode = functools.partial(decode_logged, log=str(tmp_path / "log.txt"), fail=str(tmp_path / "fail"))
    return driver.Plan(
        samples=samples, classes=["a", "b"], decoded={"x": driver.Modality("vector", (2,), "float32")}, decode=decode
    )


def decoded(tmp_path: Path) -> list[int]:
    return [int(v) for v in (tmp_path / "log.txt").read_text().split()]


def test_driver_resumes_after_a_bad_sample_and_skips_it_on_request(tmp_path):
    (tmp_path / "fail").touch()
    job = PrepareJob(name="toy", destination=tmp_path / "datasets" / "toy")
    (tmp_path / "datasets").mkdir()
    with pytest.raises(DmglError, match="file3: is broken"):
        driver.run(job, make_plan(tmp_path), preparer="toy", version="1")
    assert decoded(tmp_path) == [0, 1, 2, 3] and not job.destination.exists()

    job.skip_bad = True  # the re-run decodes only what is left, recording sample 3
    manifest = driver.run(job, make_plan(tmp_path), preparer="toy", version="1")
    assert decoded(tmp_path) == [0, 1, 2, 3, 3, 4, 5, 6, 7]
    assert manifest["bad_samples"] == [{"split": "train", "id": "s3", "path": "file3", "reason": "is broken"}]
    dataset = PreparedDataset(job.destination)
    assert dataset.split("train").inputs["x"][:, 0].tolist() == [0, 1, 2, 4, 5]
    assert np.load(job.destination / "train" / "ids.npy").tolist() == ["s0", "s1", "s2", "s4", "s5"]
    assert dataset.verify() == [] and not (tmp_path / "datasets" / ".work-toy").exists()
    assert sorted(p.name for p in job.destination.iterdir()) == ["manifest.json", "test", "train"]


def test_driver_starts_over_when_the_plan_changes(tmp_path):
    (tmp_path / "fail").touch()
    (tmp_path / "datasets").mkdir()
    job = PrepareJob(name="toy", destination=tmp_path / "datasets" / "toy")
    with pytest.raises(DmglError):
        driver.run(job, make_plan(tmp_path), preparer="toy", version="1")
    (tmp_path / "fail").unlink()
    job.options = {"something": 1}  # another option value: the earlier work does not belong to this plan
    driver.run(job, make_plan(tmp_path), preparer="toy", version="1")
    assert decoded(tmp_path) == [0, 1, 2, 3] + list(range(8))


def test_driver_workers_give_the_same_arrays(tmp_path):
    (tmp_path / "datasets").mkdir()
    one = driver.run(
        PrepareJob(name="one", destination=tmp_path / "datasets" / "one"),
        make_plan(tmp_path),
        preparer="toy",
        version="1",
    )
    two = driver.run(
        PrepareJob(name="two", destination=tmp_path / "datasets" / "two", workers=2),
        make_plan(tmp_path),
        preparer="toy",
        version="1",
    )
    assert one["files"] == two["files"]


# -------------------------------------------------------------------------------------------------- transforms

VIDEO = {
    "visual": {"kind": "video", "dtype": "uint8", "shape": [10, 8, 8, 3]},
    "audio": {"kind": "audio", "dtype": "float32", "shape": [4, 5]},
}


def config_with(options: dict, seed: int = 0) -> Config:
    config = Config()
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, options=options),
        train=dataclasses.replace(config.train, seed=seed),
    )


def video_batch(n: int = 6) -> dict[str, torch.Tensor]:
    frames = torch.arange(10, dtype=torch.uint8).view(1, 10, 1, 1, 1).expand(n, 10, 8, 8, 3).clone()
    return {"visual": frames, "audio": torch.zeros(n, 4, 5)}


def test_frame_sampling_is_centred_in_eval_and_seeded_random_in_training():
    assert frame_positions(10, 3, 2, None).tolist() == [[1, 5, 8], [1, 5, 8]]
    options = {"frames": {"visual": 3}, "augment": {"visual": "flip_crop"}}
    evaluate = build_transforms(VIDEO, config_with(options), training=False)
    train = build_transforms(VIDEO, config_with(options), training=True)
    rows = np.array([5, 2, 9, 0, 1, 7])
    out = evaluate(video_batch(), rows)
    assert out["visual"].shape == (6, 3, 8, 8, 3) and out["visual"][:, :, 0, 0, 0].tolist() == [[1, 5, 8]] * 6
    first, again = train(video_batch(), rows), train(video_batch(), rows)
    assert torch.equal(first["visual"], again["visual"])  # the same batch is transformed the same way (resume)
    picked = first["visual"][:, :, 0, 0, 0]
    assert (picked[:, 1] - picked[:, 0] >= 3).all() and (picked[:, 0] <= 3).all()
    other = train(video_batch(), rows[::-1].copy())
    assert not torch.equal(other["visual"], first["visual"][::1])
    assert torch.equal(first["audio"], video_batch()["audio"])
    shifted = build_transforms(VIDEO, config_with(options, seed=1), training=True)(video_batch(), rows)
    assert not torch.equal(shifted["visual"], first["visual"])


def test_flip_and_crop_keep_shape_and_dtype():
    images = {"image": {"kind": "image", "dtype": "uint8", "shape": [16, 16, 3]}}
    x = torch.zeros(8, 16, 16, 3, dtype=torch.uint8)
    x[:, :, :4] = 255  # a bright left edge
    flip = build_transforms(images, config_with({"augment": {"image": "flip"}}), training=True)
    out = flip({"image": x.clone()}, np.arange(8))["image"]
    flipped = out[:, 0, -1, 0] == 255
    assert out.dtype == torch.uint8 and 0 < int(flipped.sum()) < 8  # about half are mirrored
    crop = build_transforms(images, config_with({"augment": {"image": "crop"}, "crop_scale": 0.5}), training=True)
    assert crop({"image": x.clone()}, np.arange(8))["image"].shape == (8, 16, 16, 3)
    assert build_transforms(images, config_with({"augment": {"image": "flip"}}), training=False) is None


def test_transform_settings_are_checked():
    with pytest.raises(DmglError, match="names modalities the dataset does not have: face"):
        build_transforms(VIDEO, config_with({"frames": {"face": 3}}), True)
    with pytest.raises(DmglError, match="from 1 to the 10 stored frames"):
        build_transforms(VIDEO, config_with({"frames": {"visual": 11}}), True)
    with pytest.raises(DmglError, match="audio is audio, not a video"):
        build_transforms(VIDEO, config_with({"frames": {"audio": 1}}), True)
    with pytest.raises(DmglError, match="must be one of none, flip, crop, flip_crop"):
        build_transforms(VIDEO, config_with({"augment": {"visual": "rotate"}}), True)


def test_array_split_applies_its_transform_to_each_batch():
    arrays = SplitArrays(
        labels=np.zeros(4, dtype=np.int64),
        inputs={"visual": np.zeros((4, 10, 8, 8, 3), np.uint8), "audio": np.zeros((4, 4, 5), np.float32)},
    )
    split = ArraySplit(arrays, transform=build_transforms(VIDEO, config_with({"frames": {"visual": 3}}), False))
    assert split.__getitems__([0, 2])["inputs"]["visual"].shape == (2, 3, 8, 8, 3)


# ---------------------------------------------------------------------------------------------------- encoders


def test_resnet_loads_torchvision_weights_into_one_channel_audio(tmp_path):
    reference = resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    spec = {"kind": "audio", "dtype": "float32", "shape": [257, 299]}
    encoder = ENCODERS["resnet18"](spec, EncoderConfig(name="resnet18", weights=str(tmp_path / "r18.pth")), 32, 0.0)
    state = encoder.state_dict()
    assert torch.equal(state["trunk.layer4.1.conv2.weight"], reference.state_dict()["layer4.1.conv2.weight"])
    assert torch.allclose(state["trunk.conv1.weight"], reference.conv1.weight.sum(dim=1, keepdim=True), atol=1e-6)
    assert encoder(torch.randn(2, 257, 299, dtype=torch.float16)).shape == (2, 32)
    small = EncoderConfig(name="resnet18", weights=str(tmp_path / "r18.pth"), options={"width": 8})
    with pytest.raises(DmglError, match="need options.width=64"):
        ENCODERS["resnet18"](spec, small, 32, 0.0)


@pytest.mark.slow
def test_video_encoder_takes_flow_channels_and_kinetics_weights(tmp_path):
    reference = r3d_18()
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "r3d.pt")
    spec = {"kind": "video", "dtype": "uint8", "shape": [4, 16, 16, 2]}
    encoder = ENCODERS["r3d_18"](spec, EncoderConfig(name="r3d_18", weights=str(tmp_path / "r3d.pt")), 8, 0.0)
    stem = encoder.state_dict()["backbone.stem.0.weight"]
    assert stem.shape == (64, 2, 3, 7, 7)
    assert torch.allclose(stem[:, 0], reference.stem[0].weight.mean(dim=1) * 1.5, atol=1e-6)
    clip = torch.randint(0, 255, (2, 4, 16, 16, 2), dtype=torch.uint8)
    assert encoder(clip).shape == (2, 8)
    tiny = ENCODERS["r2plus1d_18"](spec, EncoderConfig(name="r2plus1d_18", options={"width": 4}), 8, 0.0)
    assert tiny(clip).shape == (2, 8) and sum(p.numel() for p in tiny.parameters()) < 200_000


def test_frame_and_image_encoders_and_auto(tmp_path):
    frames = {"kind": "video", "dtype": "uint8", "shape": [3, 16, 16, 3]}
    encoder = ENCODERS["resnet18"](frames, EncoderConfig(name="resnet18", options={"width": 4}), 8, 0.1)
    assert encoder(torch.randint(0, 255, (2, 3, 16, 16, 3), dtype=torch.uint8)).shape == (2, 8)
    image = {"kind": "image", "dtype": "uint8", "shape": [16, 16, 3]}
    assert ENCODERS["resnet50"](image, EncoderConfig(name="resnet50", options={"width": 4}), 8, 0.0)(
        torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    ).shape == (2, 8)
    auto = ENCODERS["auto"](image, EncoderConfig(name="auto", weights="bert-base-uncased", options={"width": 4}), 8, 0)
    assert auto(torch.zeros(2, 16, 16, 3, dtype=torch.uint8)).shape == (2, 8)  # weights name the text model only
    with pytest.raises(DmglError, match="takes audio"):
        ENCODERS["resnet18"]({"kind": "text", "shape": [2, 8]}, EncoderConfig(name="resnet18"), 8, 0.0)


def test_text_encoder_needs_weights_and_matching_vocabulary(tmp_path):
    from rawgen import make_tiny_text_model

    folder = make_tiny_text_model(tmp_path / "bert")
    spec = {"kind": "text", "dtype": "int64", "shape": [2, 6]}
    with pytest.raises(DmglError, match="needs `weights`"):
        ENCODERS["bert"](spec, EncoderConfig(name="bert"), 8, 0.0)
    encoder = ENCODERS["bert"](spec, EncoderConfig(name="bert", weights=str(folder), options={"pooling": "mean"}), 8, 0)
    ids = torch.tensor([[[2, 7, 9, 3, 0, 0], [1, 1, 1, 1, 0, 0]]])
    assert encoder(ids).shape == (1, 8)
    fresh = ENCODERS["bert"](spec, EncoderConfig(name="bert", weights=str(folder)), 8, 0.0)
    with pytest.raises(DmglError, match="outside the text model's vocabulary"):
        fresh(torch.tensor([[[2, 5000, 3, 0, 0, 0], [1, 1, 1, 0, 0, 0]]]))
    with pytest.raises(DmglError, match="cannot load text model"):
        ENCODERS["bert"](spec, EncoderConfig(name="bert", weights=str(tmp_path / "nothing")), 8, 0.0)
    json.dumps(spec)  # specs stay plain data
