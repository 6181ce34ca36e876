"""A user's own dataset from a CSV manifest: audio, video, image and text columns; bad rows; train one epoch."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from rawgen import COLOURS, make_tiny_text_model, write_jpeg, write_video, write_wav

from dmgl_cli.data.media import load_tokenizer, tokenize
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.data.registry import DatasetRegistry

LABELS = ["cat", "dog", "owl"]
SMALL = ["-o", "frame_size=32", "-o", "image_size=32", "-o", "max_tokens=16", "-o", "frames=4", "-o", "audio_seconds=1"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


def write_manifest(root, per_class=3, with_split=True):
    rows = []
    for c, label in enumerate(LABELS):
        for k in range(per_class):
            ident = f"{label}{k}"
            write_wav(root / "sounds" / f"{ident}.wav", 0.5, 300 + 100 * c)
            write_video(root / "clips" / f"{ident}.mp4", 6, COLOURS[c])
            write_jpeg(root / "photos" / f"{ident}.jpg", COLOURS[c])
            caption = f"oh great {label} again"
            if k == 0:
                (root / "captions").mkdir(exist_ok=True)
                (root / "captions" / f"{ident}.txt").write_text(caption + "\n")
                caption = f"captions/{ident}.txt"
            row = {
                "id": ident,
                "label": label,
                "voice": f"sounds/{ident}.wav",
                "face": f"clips/{ident}.mp4",
                "photo": f"photos/{ident}.jpg",
                "caption": caption,
            }
            if with_split:
                row["split"] = ["train", "train", "test"][k]
            rows.append(row)
    with open(root / "samples.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


KINDS = [
    "--modality",
    "voice=audio",
    "--modality",
    "face=video",
    "--modality",
    "photo=image",
    "--modality",
    "caption=text",
]


@pytest.mark.slow
def test_custom_manifest_prepares_every_kind_and_trains(run_cli, registry, tmp_path, text_model):
    rows = write_manifest(tmp_path)
    result = run_cli(
        "prepare", "custom", "--manifest", tmp_path / "samples.csv", *KINDS, "--text-model", text_model, *SMALL
    )
    assert "prepared custom: 3 classes; train 6, test 3" in result.output
    dataset = PreparedDataset(registry / "datasets" / "custom")
    assert dataset.classes == LABELS
    assert dataset.modalities == {
        "voice": {"kind": "audio", "dtype": "float32", "shape": [257, 98]},
        "face": {"kind": "video", "dtype": "uint8", "shape": [4, 32, 32, 3]},
        "photo": {"kind": "image", "dtype": "uint8", "shape": [32, 32, 3]},
        "caption": {"kind": "text", "dtype": "int64", "shape": [2, 16]},
    }
    test = dataset.split("test")
    ids = np.load(dataset.path / "test" / "ids.npy").tolist()
    assert ids == ["cat2", "dog2", "owl2"] and test.labels.tolist() == [0, 1, 2]
    tokenizer = load_tokenizer(str(text_model))
    expected = tokenize(tokenizer, [r["caption"] for r in rows if r["split"] == "test"], 16)
    assert np.array_equal(test.inputs["caption"], expected)
    # The caption given as a .txt file is read from the file, not tokenised as its path.
    train_ids = np.load(dataset.path / "train" / "ids.npy").tolist()
    first = dataset.split("train").inputs["caption"][train_ids.index("cat0")]
    assert np.array_equal(first, tokenize(tokenizer, ["oh great cat again"], 16)[0])
    assert np.abs(test.inputs["photo"][1, 2, 2].astype(int) - np.array(COLOURS[1])).max() > 100  # inverted corner
    assert np.abs(test.inputs["photo"][1, -2, -2].astype(int) - np.array(COLOURS[1])).max() < 30
    assert DatasetRegistry(registry).get("custom")["splits"] == {"train": 6, "test": 3}
    assert dataset.manifest["extra"]["text_model"] == str(text_model)

    trained = run_cli(
        "train",
        "--recipe",
        "custom",
        "--epochs",
        "1",
        "--silent",
        "--set",
        "model.embed_dim=8",
        "--set",
        f"model.encoders.default.weights={text_model}",
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
    )
    assert "test_acc" in trained.output


def test_yaml_spec_without_split_column_holds_out_a_seeded_test_split(run_cli, registry, tmp_path, text_model):
    write_manifest(tmp_path, per_class=4, with_split=False)
    (tmp_path / "spec.yaml").write_text(
        "label: label\nid: id\nmodalities:\n  voice: {kind: audio, seconds: 0.5}\n  photo: {kind: image, size: 24}\n"
    )
    run_cli(
        "prepare",
        "custom",
        "--manifest",
        tmp_path / "samples.csv",
        "-o",
        f"spec={tmp_path / 'spec.yaml'}",
        "-o",
        "test_fraction=0.25",
        "--silent",
    )
    dataset = PreparedDataset(registry / "datasets" / "custom")
    assert dataset.manifest["splits"] == {"train": 9, "test": 3}
    assert sorted(dataset.split("test").labels.tolist()) == [0, 1, 2]
    assert dataset.modalities["voice"]["shape"] == [257, 48] and dataset.modalities["photo"]["shape"] == [24, 24, 3]


def test_missing_file_and_empty_cells_stop_or_are_recorded(run_cli, registry, tmp_path, text_model):
    write_manifest(tmp_path)
    (tmp_path / "photos" / "dog1.jpg").unlink()
    with open(tmp_path / "samples.csv", "a") as handle:
        handle.write("owl9,,sounds/owl0.wav,clips/owl0.mp4,photos/owl0.jpg,hello,train\n")
    args = ["prepare", "custom", "--manifest", tmp_path / "samples.csv", *KINDS, "--text-model", text_model, *SMALL]
    result = run_cli(*args, "--silent", expect=1)
    assert "samples.csv:11: has no label" in result.output and "--skip-bad" in result.output
    run_cli(*args, "--silent", "--skip-bad")
    manifest = json.loads((registry / "datasets" / "custom" / "manifest.json").read_text())
    reasons = {r["id"]: r["reason"] for r in manifest["bad_samples"]}
    assert reasons["owl9"] == "has no label" and "does not exist (column photo)" in reasons["dog1"]
    assert manifest["splits"] == {"train": 5, "test": 3}


def test_audio_spectrogram_frames_sets_the_width_globally_or_per_modality(run_cli, registry, tmp_path):
    write_manifest(tmp_path)
    voice = ["--manifest", tmp_path / "samples.csv", "--modality", "voice=audio"]
    run_cli("prepare", "custom", *voice, "--name", "wide", "-o", "audio_spectrogram_frames=40")
    assert PreparedDataset(registry / "datasets" / "wide").modalities["voice"]["shape"] == [257, 40]
    spec = tmp_path / "modalities.yaml"
    spec.write_text("modalities:\n  voice: {kind: audio, spectrogram_frames: 25}\n")
    run_cli("prepare", "custom", "--manifest", tmp_path / "samples.csv", "--name", "narrow", "-o", f"spec={spec}")
    assert PreparedDataset(registry / "datasets" / "narrow").modalities["voice"]["shape"] == [257, 25]
    spec.write_text("modalities:\n  voice: {kind: audio, spectrogram_frames: 25, seconds: 1}\n")
    result = run_cli("prepare", "custom", "--manifest", tmp_path / "samples.csv", "-o", f"spec={spec}", expect=1)
    assert "modality voice: give seconds or spectrogram_frames, not both" in result.output
    result = run_cli("prepare", "custom", *voice, "-o", "audio_spectrogram_frames=0", expect=1)
    assert "option audio_spectrogram_frames must be a whole number of spectrogram columns >= 1" in result.output


def test_custom_needs_a_manifest_and_kinds(run_cli, registry, tmp_path):
    assert "needs --manifest" in run_cli("prepare", "custom", expect=1).output
    write_manifest(tmp_path, per_class=1)
    result = run_cli("prepare", "custom", "--manifest", tmp_path / "samples.csv", expect=1)
    assert "--modality COLUMN=KIND" in result.output
    result = run_cli("prepare", "custom", "--manifest", tmp_path / "samples.csv", "--modality", "nope=audio", expect=1)
    assert "no column nope" in result.output
    result = run_cli("prepare", "crema-d", "--manifest", tmp_path / "samples.csv", expect=1)
    assert "--manifest does not apply to `dmgl prepare crema-d`" in result.output
