"""`dmgl explain`: GradCAM peaks on the planted discriminative patch of a tiny CNN; the command end to end on a
prepared image + audio dataset (overlay PNGs written and logged under explain/); its refusals."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from rawgen import COLOURS, write_jpeg, write_wav
from torch import nn

from dmgl_cli.errors import DmglError
from dmgl_cli.explain import choose_samples, gradcam, normalise, overlay, target_layer, upsample_maps
from dmgl_cli.tracking import Tracker

PATCH = (slice(8, 16), slice(16, 24))  # rows, columns of the bright patch that decides class 1


def planted(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """32 x 32 noise images; class 1 has a bright 8 x 8 patch at PATCH, class 0 none."""
    images = torch.rand(count, 1, 32, 32, generator=generator) * 0.5
    labels = torch.randint(0, 2, (count,), generator=generator)
    images[labels == 1, :, PATCH[0], PATCH[1]] += 1.0
    return images, labels


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_gradcam_peaks_on_the_planted_patch():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = TinyCNN()
    optimiser = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        images, labels = planted(32, generator)
        loss = nn.functional.cross_entropy(net(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    images, labels = planted(64, generator)
    assert (net(images).argmax(1) == labels).float().mean() > 0.95  # it learnt the patch
    layer = target_layer(net)
    assert layer is net.features[3]  # no residual block: the last convolution
    with_patch = images[labels == 1]
    maps = gradcam(net, layer, with_patch, [1] * len(with_patch))
    assert maps.shape == (len(with_patch), 1, 16, 16) and (maps >= 0).all()
    heat = upsample_maps(maps, len(with_patch), 1, (32, 32))[:, 0]
    for single in heat:
        row, column = divmod(int(single.argmax()), 32)
        assert PATCH[0].start <= row < PATCH[0].stop and PATCH[1].start <= column < PATCH[1].stop
    picture = overlay((with_patch[0, 0].numpy()[..., None] * 255).astype(np.uint8), normalise(heat[0].numpy()))
    assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8


def test_target_layer_is_the_last_residual_block_and_refuses_encoders_without_convolutions():
    from dmgl_cli.models.vision import FrameEncoder, ResNetTrunk, _ScaledVideoResNet

    trunk = ResNetTrunk("resnet18", 3, 4)
    assert target_layer(FrameEncoder(trunk, 3, 8, 0.0)) is trunk.layer4[-1]
    video = _ScaledVideoResNet("r3d_18", 3, 4)
    assert target_layer(video) is video.layer4[-1]
    with pytest.raises(DmglError, match="no convolutional layer"):
        target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "modality 'fast''s encoder (mlp)")


def test_gradcam_of_video_encoders_gives_one_map_per_frame():
    """A 2-D encoder folds the frames into the batch (a map per frame); a 3-D one keeps time in the map."""
    from dmgl_cli.models.vision import ClipEncoder, FrameEncoder, ResNetTrunk, _ScaledVideoResNet

    torch.manual_seed(0)
    clips = torch.randint(0, 256, (2, 3, 64, 64, 3), dtype=torch.uint8)
    frames = FrameEncoder(ResNetTrunk("resnet18", 3, 4), 3, 5, 0.0).eval()
    maps = gradcam(frames, target_layer(frames), clips, [0, 4])
    assert maps.shape == (2 * 3, 1, 2, 2)
    assert upsample_maps(maps, 2, 3, (64, 64)).shape == (2, 3, 64, 64)
    clip = ClipEncoder(_ScaledVideoResNet("r3d_18", 3, 4), 3, 5, 0.0).eval()
    maps = gradcam(clip, target_layer(clip), clips, [1, 2])
    assert maps.dim() == 5 and maps.shape[:2] == (2, 1)
    assert upsample_maps(maps, 2, 3, (64, 64)).shape == (2, 3, 64, 64)


def test_upsampling_folded_frames_and_3d_clips():
    folded = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(6, 1, 2, 2)
    assert upsample_maps(folded, 2, 3, (8, 8)).shape == (2, 3, 8, 8)
    clip = torch.rand(2, 1, 2, 2, 2)
    assert upsample_maps(clip, 2, 4, (8, 8)).shape == (2, 4, 8, 8)
    with pytest.raises(DmglError, match="fits neither"):
        upsample_maps(torch.rand(5, 1, 2, 2), 2, 3, (8, 8))


def test_samples_take_one_class_at_a_time():
    labels = np.array([2, 0, 0, 1, 2, 1, 0])
    assert choose_samples(labels, 4, None) == [1, 3, 0, 2]
    assert choose_samples(labels, None, [6, 6, 0]) == [6, 0]
    with pytest.raises(DmglError, match="outside the test split"):
        choose_samples(labels, None, [7])


# ------------------------------------------------------------------------------------ the command end to end

LABELS = ["cat", "dog", "owl"]
TINY = [
    "--epochs",
    "1",
    "--silent",
    "--set",
    "model.embed_dim=8",
    "--set",
    "model.encoders.default.options.width=4",
    "--set",
    "train.batch_size=4",
    "--set",
    "data.num_workers=0",
    "--set",
    "train.device=cpu",
    "--set",
    "data.val_fraction=0.34",
]


@pytest.fixture
def photos(run_cli, tmp_path):
    """A prepared `custom` dataset: a 64 x 64 photo (image) and a voice (audio) per sample, 3 classes."""
    rows = []
    for c, label in enumerate(LABELS):
        for k in range(3):
            ident = f"{label}{k}"
            write_jpeg(tmp_path / "photos" / f"{ident}.jpg", COLOURS[c], size=(64, 64))
            write_wav(tmp_path / "sounds" / f"{ident}.wav", 0.3, 300 + 100 * c)
            split = ["train", "train", "test"][k]
            rows.append(
                {"label": label, "photo": f"photos/{ident}.jpg", "voice": f"sounds/{ident}.wav", "split": split}
            )
    with open(tmp_path / "samples.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run_cli(
        "prepare",
        "custom",
        "--manifest",
        tmp_path / "samples.csv",
        "--modality",
        "photo=image",
        "--modality",
        "voice=audio",
        "-o",
        "image_size=64",
        "-o",
        "audio_seconds=0.3",
        "--silent",
    )
    return "custom"


def _seed_run(run_cli, *args: str) -> str:
    import json

    result = run_cli("train", "--recipe", "custom", *TINY, *args, "--json")
    return json.loads(result.stdout)["seeds"][0]["run_id"]


@pytest.mark.slow
def test_explain_writes_and_logs_overlays_side_by_side(run_cli, photos, tmp_path):
    concat = _seed_run(run_cli, "--strategy", "constant", "--alpha", "0")
    ours = _seed_run(run_cli, "--strategy", "heuristic")
    out = tmp_path / "figures"
    result = run_cli("explain", concat, "--compare", ours, "--indices", "0,2", "--out", out)
    grid = out / f"gradcam-photo-{concat[:8]}-vs-{ours[:8]}.png"
    expected = {grid.name} | {f"photo-test{i}-{r[:8]}.png" for i in (0, 2) for r in (concat, ours)}
    assert {p.name for p in out.iterdir()} == expected
    assert f"wrote {grid}" in result.output
    import matplotlib.image

    pixels = matplotlib.image.imread(out / f"photo-test0-{concat[:8]}.png")
    assert pixels.shape[:2] == (64, 64) and pixels.std() > 0
    tracker = Tracker()
    for run_id in (concat, ours):
        folder = tracker._artifact_dir(run_id)
        assert folder is not None
        logged = {p.name for p in (folder / "explain").iterdir()}
        assert logged == {grid.name, f"photo-test0-{run_id[:8]}.png", f"photo-test2-{run_id[:8]}.png"}

    # A parent run stands for its best seed; the default picks one test sample per class in turn.
    parent = tracker.get_run(concat).parent_id
    assert parent
    single = run_cli("explain", parent, "--samples", "2", "--out", tmp_path / "single", "--json")
    import json

    document = json.loads(single.stdout)
    assert document["modality"] == "photo" and document["indices"] == [0, 1]
    assert list(document["artifacts"]) == [concat]

    # User errors: one message, no traceback.
    refused = run_cli("explain", concat, "--modality", "voice", expect=1)
    assert "modality 'voice' is audio; dmgl explain draws image and video modalities (photo)" in refused.output
    assert (
        "--indices 9 outside the test split (0 to 2)" in run_cli("explain", concat, "--indices", "9", expect=1).output
    )
    assert "give --samples or --indices" in run_cli("explain", concat, "-n", "2", "--indices", "1", expect=1).output
    assert "--indices takes" in run_cli("explain", concat, "--indices", "a,b", expect=1).output
    assert "does not exist" in run_cli("explain", "nope", expect=1).output
