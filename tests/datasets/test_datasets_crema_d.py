"""CREMA-D from raw files in the real layout (WAV + FLV): prepare, check, train one epoch; bad inputs; resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rawgen import COLOURS, CREMA_EMOTIONS, corrupt_wav, make_crema_d, write_video

from dmgl_cli.data.media import (
    SAMPLE_RATE,
    audio_spectrogram,
    seconds_for_frames,
    spectrogram_frames,
    spectrogram_shape,
)
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.data.preparers.common import exact_stratified_split
from dmgl_cli.data.registry import DatasetRegistry

SMALL = ["-o", "frame_size=32"]
TINY_TRAIN = [
    "--epochs",
    "1",
    "--silent",
    "--set",
    "model.embed_dim=16",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.eval_batch_size=32",
    "--set",
    "data.num_workers=0",
    "--set",
    "train.device=cpu",
    "--set",
    "model.encoders.audio.options.width=4",
    "--set",
    "model.encoders.visual.options.width=4",
]


@pytest.fixture
def crema_raw(tmp_path):
    root = tmp_path / "CREMA-D"
    make_crema_d(root)
    return root


@pytest.mark.slow
def test_prepare_checks_shapes_labels_registry_and_trains(run_cli, registry, crema_raw):
    result = run_cli("prepare", "crema-d", "--raw", crema_raw, "--workers", "2", *SMALL)
    assert "prepared crema-d: 6 classes; train 16, test 2; audio (257, 299), visual (10, 32, 32, 3)" in result.output
    dataset = PreparedDataset(registry / "datasets" / "crema-d")
    assert dataset.classes == CREMA_EMOTIONS
    for split in ("train", "test"):
        arrays = dataset.split(split)
        ids = np.load(dataset.path / split / "ids.npy")
        assert arrays.inputs["audio"].shape[1:] == (257, 299) and arrays.inputs["audio"].dtype == np.float32
        assert arrays.inputs["visual"].shape[1:] == (10, 32, 32, 3) and arrays.inputs["visual"].dtype == np.uint8
        for row, clip in enumerate(ids):
            emotion = CREMA_EMOTIONS.index(clip.split("_")[2])
            assert arrays.labels[row] == emotion
            # The frames carry the clip's colour (the encoder's round trip is lossy, so roughly).
            corner = arrays.inputs["visual"][row, :, 2, -2].astype(float).mean(axis=0)
            assert np.abs(corner - COLOURS[emotion]).max() < 40
        # The stored spectrogram is exactly what the media helper computes from the WAV.
        expected = audio_spectrogram(crema_raw / "AudioWAV" / f"{ids[0]}.wav", 3.0)
        np.testing.assert_allclose(arrays.inputs["audio"][0], expected, rtol=1e-5, atol=1e-5)
    # Stratified split: the two test clips come from two different emotions.
    assert len(set(dataset.split("test").labels.tolist())) == 2
    row = DatasetRegistry(registry).get("crema-d")
    assert row["splits"] == {"train": 16, "test": 2} and row["bad_samples"] == 0
    assert row["modalities"]["visual"] == {
        "kind": "video",
        "dtype": "uint8",
        "shape": [10, 32, 32, 3],
        "storage": "jpeg",
    }
    assert row["checksum"] == dataset.checksum and row["preparer"] == "crema-d"
    assert not list((registry / "datasets").glob(".work-*"))
    assert "all files match" in run_cli("datasets", "verify", "crema-d").output

    trained = run_cli("train", "--recipe", "crema-d", *TINY_TRAIN)
    assert "test_acc" in trained.output and "acc_audio" in trained.output


def test_split_files_and_seeded_default(run_cli, registry, crema_raw, tmp_path):
    clips = sorted(p.stem for p in (crema_raw / "AudioWAV").glob("*.wav"))
    test_clips = [c for c in clips if c.startswith("1003")]
    (tmp_path / "train.csv").write_text(
        "clip_id,label\n" + "".join(f"{c},{c.split('_')[2]}\n" for c in clips if c not in test_clips)
    )
    (tmp_path / "test.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in test_clips))
    run_cli(
        "prepare",
        "crema-d",
        "--raw",
        crema_raw,
        "--split-file",
        f"train={tmp_path / 'train.csv'}",
        "--split-file",
        f"test={tmp_path / 'test.csv'}",
        "--name",
        "crema-files",
        *SMALL,
        "--silent",
    )
    dataset = PreparedDataset(registry / "datasets" / "crema-files")
    assert sorted(np.load(dataset.path / "test" / "ids.npy").tolist()) == test_clips
    assert dataset.manifest["splits"] == {"train": 12, "test": 6}

    (tmp_path / "bad.csv").write_text("1001_DFA_ANG_XX,SAD\n")
    result = run_cli(
        "prepare",
        "crema-d",
        "--raw",
        crema_raw,
        "--split-file",
        f"train={tmp_path / 'bad.csv'}",
        "--split-file",
        f"test={tmp_path / 'test.csv'}",
        "--name",
        "crema-bad",
        expect=1,
    )
    assert "labelled SAD but its file name says ANG" in result.output


def test_exact_stratified_split_matches_the_paper_sizes():
    rng = np.random.default_rng(0)
    labels = rng.choice(6, size=7442, p=[0.17, 0.17, 0.17, 0.17, 0.15, 0.17])
    kept, held = exact_stratified_split(labels, round(7442 * 744 / 7442), seed=5)
    assert len(held) == 744 and len(kept) == 6698 and not set(kept) & set(held)
    for cls in range(6):
        share = np.mean(labels[held] == cls) - np.mean(labels == cls)
        assert abs(share) < 0.002
    again, _ = exact_stratified_split(labels, 744, seed=5)
    other, _ = exact_stratified_split(labels, 744, seed=6)
    assert np.array_equal(again, kept) and not np.array_equal(other, kept)


def test_seconds_for_frames_is_the_shortest_length_with_that_many_columns():
    assert seconds_for_frames(188) == 1.8903125 and spectrogram_shape(seconds_for_frames(188)) == (257, 188)
    for frames in (1, 2, 187, 188, 299, 1004, 4321):
        seconds = seconds_for_frames(frames)
        assert spectrogram_frames(seconds) == frames
        if frames > 1:
            assert spectrogram_frames(seconds - 1 / SAMPLE_RATE) == frames - 1


def test_spectrogram_frames_sets_the_audio_width_with_one_message_for_a_bad_value(run_cli, registry, crema_raw):
    result = run_cli(
        "prepare", "crema-d", "--raw", crema_raw, "--name", "crema-188", "-o", "spectrogram_frames=188", *SMALL
    )
    assert "audio (257, 188)" in result.output
    dataset = PreparedDataset(registry / "datasets" / "crema-188")
    first = np.load(dataset.path / "train" / "ids.npy")[0]
    expected = audio_spectrogram(crema_raw / "AudioWAV" / f"{first}.wav", seconds_for_frames(188))
    np.testing.assert_allclose(dataset.split("train").inputs["audio"][0], expected, rtol=1e-5, atol=1e-5)
    for bad in ("0", "-3", "1.5", "many", "true"):
        result = run_cli("prepare", "crema-d", "--raw", crema_raw, "-o", f"spectrogram_frames={bad}", expect=1)
        assert "option spectrogram_frames must be a whole number of spectrogram columns >= 1" in result.output
        assert "Traceback" not in result.output
    result = run_cli(
        "prepare", "crema-d", "--raw", crema_raw, "-o", "seconds=2", "-o", "spectrogram_frames=188", expect=1
    )
    assert "give -o seconds or -o spectrogram_frames, not both" in result.output
    assert not (registry / "datasets" / "crema-d").exists()


def test_missing_folder_lists_what_is_missing_and_the_layout(run_cli, registry, tmp_path):
    (tmp_path / "raw" / "AudioWAV").mkdir(parents=True)
    result = run_cli("prepare", "crema-d", "--raw", tmp_path / "raw", expect=1)
    assert "missing VideoFlash/" in result.output and "AudioWAV/1001_DFA_ANG_XX.wav" in result.output
    result = run_cli("prepare", "crema-d", expect=1)
    assert "needs --raw PATH" in result.output


def test_corrupt_wav_stops_with_its_path_then_skip_bad_records_it_and_resumes(run_cli, registry, crema_raw):
    bad = crema_raw / "AudioWAV" / "1002_DFA_FEA_XX.wav"
    corrupt_wav(bad)
    result = run_cli("prepare", "crema-d", "--raw", crema_raw, *SMALL, "--silent", expect=1)
    assert str(bad) in result.output and "--skip-bad" in result.output
    assert not (registry / "datasets" / "crema-d").exists()
    work = registry / "datasets" / ".work-crema-d"
    done_before = (work / "done.log").read_text().splitlines()
    assert done_before  # the clips prepared before the bad one are kept for the next run

    result = run_cli("prepare", "crema-d", "--raw", crema_raw, *SMALL, "--skip-bad")
    assert "skipped 1 unreadable samples" in result.output
    assert "decoding:   0%|          | 0/18" not in result.output  # resumed, not restarted
    manifest = json.loads((registry / "datasets" / "crema-d" / "manifest.json").read_text())
    (record,) = manifest["bad_samples"]
    assert (
        record["id"] == "1002_DFA_FEA_XX" and record["path"] == str(bad) and "not a readable audio" in record["reason"]
    )
    assert sum(manifest["splits"].values()) == 17
    ids = np.concatenate([np.load(registry / "datasets" / "crema-d" / s / "ids.npy") for s in manifest["splits"]])
    assert "1002_DFA_FEA_XX" not in ids
    assert DatasetRegistry(registry).get("crema-d")["bad_samples"] == 1
    assert not work.exists()


def test_video_shorter_than_the_requested_frames(run_cli, registry, crema_raw):
    short = crema_raw / "VideoFlash" / "1001_DFA_HAP_XX.flv"
    write_video(short, 5, COLOURS[3])
    result = run_cli("prepare", "crema-d", "--raw", crema_raw, *SMALL, "--silent", expect=1)
    assert f"{short}: has 5 video frames, fewer than the 10 requested" in result.output
    run_cli("prepare", "crema-d", "--raw", crema_raw, *SMALL, "--silent", "-o", "frames=4")  # fewer frames: fine
    run_cli("prepare", "crema-d", "--raw", crema_raw, *SMALL, "--silent", "--skip-bad", "--name", "crema-skip")
    manifest = json.loads((registry / "datasets" / "crema-skip" / "manifest.json").read_text())
    assert [r["id"] for r in manifest["bad_samples"]] == ["1001_DFA_HAP_XX"]


@pytest.mark.slow
def test_an_mlp_encoder_is_built_for_the_sampled_frames(run_cli, registry, crema_raw):
    # The recipe samples 3 of the 10 stored frames: an encoder whose size depends on its input must see 3.
    run_cli("prepare", "crema-d", "--raw", crema_raw, *SMALL)
    result = run_cli(
        "train",
        "--recipe",
        "crema-d",
        "--epochs",
        "1",
        "--set",
        "model.embed_dim=8",
        "--set",
        "train.batch_size=8",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.device=cpu",
        "--set",
        "model.encoders.visual.name=mlp",
        "--set",
        "model.encoders.visual.hidden=8",
        "--set",
        "model.encoders.audio.options.width=4",
    )
    assert "mean over 1 seeds" in result.output
