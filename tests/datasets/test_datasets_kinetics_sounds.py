"""Kinetics-Sounds from MP4 clips (video + AAC audio) and an annotation CSV or the lineage's id,label lists."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from rawgen import KS_CLASSES, make_kinetics_sounds, truncate

from dmgl_cli.data.media import audio_spectrogram
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.data.registry import DatasetRegistry

SMALL = ["-o", "frame_size=24"]


@pytest.mark.slow
def test_annotations_csv_prepares_three_splits_and_trains(run_cli, registry, tmp_path):
    rows = make_kinetics_sounds(tmp_path)
    result = run_cli("prepare", "kinetics-sounds", "--raw", tmp_path, *SMALL)
    assert (
        "prepared kinetics-sounds: 3 classes; train 9, val 3, test 3; audio (257, 1004), visual (10, 24, 24, 3)"
        in result.output
    )
    dataset = PreparedDataset(registry / "datasets" / "kinetics-sounds")
    assert dataset.classes == sorted(KS_CLASSES)
    val = dataset.split("val")
    ids = np.load(dataset.path / "val" / "ids.npy").tolist()
    assert ids == [r["clip"] for r in rows if r["split"] == "val"]
    assert val.labels.tolist() == [sorted(KS_CLASSES).index(r["label"]) for r in rows if r["split"] == "val"]
    assert val.inputs["audio"].dtype == np.float16
    # The audio track of the MP4 (decoded with PyAV, repeated to 10 s) is what was stored.
    expected = audio_spectrogram(tmp_path / "videos" / f"{ids[0]}.mp4", 10.0)
    np.testing.assert_allclose(val.inputs["audio"][0].astype(np.float32), expected, rtol=2e-3, atol=2e-2)
    row = DatasetRegistry(registry).get("kinetics-sounds")
    assert row["splits"] == {"train": 9, "val": 3, "test": 3}
    assert row["modalities"]["audio"]["shape"] == [257, 1004]

    trained = run_cli(
        "train",
        "--recipe",
        "kinetics-sounds",
        "--epochs",
        "1",
        "--silent",
        "--set",
        "model.embed_dim=8",
        "--set",
        "model.encoders.audio.options.width=4",
        "--set",
        "model.encoders.visual.options.width=4",
        "--set",
        "train.batch_size=4",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.device=cpu",
    )
    assert "test_acc" in trained.output


def test_lineage_id_label_lists_and_kinetics_columns(run_cli, registry, tmp_path):
    rows = make_kinetics_sounds(tmp_path, per_split={"train": 2, "test": 1})
    for split in ("train", "test"):
        with open(tmp_path / f"my_{split}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([(r["clip"], r["label"]) for r in rows if r["split"] == split])
    run_cli(
        "prepare",
        "kinetics-sounds",
        "--raw",
        tmp_path,
        "--split-file",
        f"train={tmp_path / 'my_train.csv'}",
        "--split-file",
        f"test={tmp_path / 'my_test.csv'}",
        "--name",
        "ks-lists",
        *SMALL,
        "--silent",
    )
    assert PreparedDataset(registry / "datasets" / "ks-lists").manifest["splits"] == {"train": 6, "test": 3}

    # Kinetics' own columns: the clip name is rebuilt from youtube_id and the times.
    with open(tmp_path / "kinetics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split", "is_cc"])
        for r in rows:
            writer.writerow([r["label"], r["clip"][: -len("_000010_000020")], 10, 20, r["split"], 0])
    run_cli(
        "prepare",
        "kinetics-sounds",
        "--raw",
        tmp_path,
        "-o",
        f"annotations={tmp_path / 'kinetics.csv'}",
        "--name",
        "ks-kinetics",
        *SMALL,
        "--silent",
    )
    assert PreparedDataset(registry / "datasets" / "ks-kinetics").manifest["splits"] == {"train": 6, "test": 3}


def test_missing_and_truncated_clips(run_cli, registry, tmp_path):
    rows = make_kinetics_sounds(tmp_path, per_split={"train": 2, "test": 1})
    (tmp_path / "videos" / f"{rows[0]['clip']}.mp4").unlink()
    result = run_cli("prepare", "kinetics-sounds", "--raw", tmp_path, *SMALL, expect=1)
    assert f"1 annotated clips have no video file under {tmp_path / 'videos'}: {rows[0]['clip']}" in result.output
    truncate(tmp_path / "videos" / f"{rows[1]['clip']}.mp4", 0.3)
    result = run_cli("prepare", "kinetics-sounds", "--raw", tmp_path, *SMALL, "--skip-bad", "--silent")
    manifest = json.loads((registry / "datasets" / "kinetics-sounds" / "manifest.json").read_text())
    assert sorted(r["id"] for r in manifest["bad_samples"]) == sorted([rows[0]["clip"], rows[1]["clip"]])
    assert manifest["splits"] == {"train": 4, "test": 3}


def test_missing_annotations_shows_layout(run_cli, registry, tmp_path):
    (tmp_path / "videos").mkdir()
    result = run_cli("prepare", "kinetics-sounds", "--raw", tmp_path, expect=1)
    assert "missing annotations.csv" in result.output and "--split-file train=train.csv" in result.output
