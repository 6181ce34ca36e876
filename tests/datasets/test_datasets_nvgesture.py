"""NVGesture from NVIDIA's layout (AVI colour + depth videos, the two .lst files): RGB, depth, optical flow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rawgen import make_nvgesture, nvgesture_line, write_video

from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.data.preparers.nvgesture import parse_line
from dmgl_cli.data.registry import DatasetRegistry

SMALL = ["-o", "frames=4", "-o", "frame_size=16"]
LIST = "nvgesture_train_correct_cvpr2016_v2.lst"


@pytest.mark.slow
def test_prepares_rgb_depth_flow_and_trains(run_cli, registry, tmp_path):
    lists = make_nvgesture(tmp_path)
    result = run_cli("prepare", "nvgesture", "--raw", tmp_path, *SMALL)
    assert (
        "prepared nvgesture: 25 classes; train 6, test 3; rgb (4, 16, 16, 3), depth (4, 16, 16, 1), "
        "flow (4, 16, 16, 2)" in result.output
    )
    dataset = PreparedDataset(registry / "datasets" / "nvgesture")
    train = dataset.split("train")
    assert train.labels.tolist() == [int(line.rsplit("label:", 1)[1]) - 1 for line in lists["train"]]
    assert np.load(dataset.path / "train" / "ids.npy")[0] == "Video_data/class_01/subject1_r0"
    assert train.inputs["depth"].dtype == np.uint8 and train.inputs["flow"].shape == (6, 4, 16, 16, 2)
    # The block moves right by 3 pixels a frame: horizontal flow is positive where it is, vertical about zero.
    flow = train.inputs["flow"].astype(float) - 127.5
    assert flow[..., 0].max() > 5 and np.abs(np.median(flow[..., 1])) < 2
    # Depth is the first channel of the (grey) depth video: one channel, close to the colour frame's luminance.
    assert train.inputs["depth"].std() > 5
    row = DatasetRegistry(registry).get("nvgesture")
    assert row["splits"] == {"train": 6, "test": 3} and row["num_classes"] == 25
    assert dataset.manifest["extra"]["optical_flow"]["algorithm"] == "opencv farneback"

    trained = run_cli(
        "train",
        "--recipe",
        "nvgesture",
        "--epochs",
        "1",
        "--silent",
        "--set",
        "model.embed_dim=8",
        *[
            a
            for m in ("rgb", "depth", "flow")
            for a in ("--set", f"model.encoders.{m}.weights=null", "--set", f"model.encoders.{m}.options.width=4")
        ],
        "--set",
        "train.batch_size=4",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.device=cpu",
        "--set",
        "data.val_fraction=0.34",
    )
    assert "test_acc" in trained.output and "acc_flow" in trained.output


def test_list_lines_are_parsed_exactly():
    folder, colour, depth, label = parse_line(
        "path:./Video_data/class_01/subject13_r0 depth:sk_depth:46:126 color:sk_color:46:126 "
        "duo_left:duo_left:60:168 label:1"
    )
    assert (folder, colour, depth, label) == ("./Video_data/class_01/subject13_r0", (46, 126), (46, 126), 0)


def test_malformed_line_and_short_video(run_cli, registry, tmp_path):
    make_nvgesture(tmp_path)
    with open(tmp_path / LIST, "a") as handle:
        handle.write("path:./Video_data/class_02/subject9_r0 depth:sk_depth:0:10 color:sk_color:0:10\n")
    result = run_cli("prepare", "nvgesture", "--raw", tmp_path, *SMALL, expect=1)
    assert f"{tmp_path / LIST}:7: has no label field" in result.output

    lines = (tmp_path / LIST).read_text().splitlines()[:6]
    folder = tmp_path / "Video_data" / "class_03" / "subject99_r0"
    write_video(folder / "sk_color.avi", 3, (10, 20, 30), width=40, height=30)
    write_video(folder / "sk_depth.avi", 3, (10, 10, 10), width=40, height=30)
    (tmp_path / LIST).write_text("\n".join(lines + [nvgesture_line(3, 99, 0, 0, 12)]) + "\n")
    result = run_cli("prepare", "nvgesture", "--raw", tmp_path, *SMALL, "--silent", expect=1)
    assert f"{folder / 'sk_color.avi'}: has 3 video frames in its range [0, 12), fewer than the 4" in result.output
    run_cli("prepare", "nvgesture", "--raw", tmp_path, *SMALL, "--silent", "--skip-bad")
    manifest = json.loads((registry / "datasets" / "nvgesture" / "manifest.json").read_text())
    assert [r["id"] for r in manifest["bad_samples"]] == ["Video_data/class_03/subject99_r0"]
    assert manifest["splits"] == {"train": 6, "test": 3}


def test_missing_lists_show_the_layout(run_cli, registry, tmp_path):
    (tmp_path / "Video_data").mkdir()
    result = run_cli("prepare", "nvgesture", "--raw", tmp_path, expect=1)
    assert "missing nvgesture_train_correct_cvpr2016_v2.lst, nvgesture_test_correct_cvpr2016_v2.lst" in result.output
    assert "label:K" in result.output
