"""Sarcasm and Twitter2015 from their raw text/TSV + JPEG files: prepare, check, train one epoch; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rawgen import COLOURS, TWITTER_HEADER, make_sarcasm, make_tiny_text_model, make_twitter2015, truncate

from dmgl_cli.data.media import load_tokenizer, tokenize
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.data.registry import DatasetRegistry


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


def small(text_model) -> list[str]:
    return ["--text-model", text_model, "-o", "image_size=32", "-o", "max_tokens=24"]


def tiny_train(recipe: str, text_model) -> list[str]:
    return [
        "train",
        "--recipe",
        recipe,
        "--epochs",
        "1",
        "--silent",
        "--set",
        "model.embed_dim=8",
        "--set",
        f"model.encoders.text.weights={text_model}",
        "--set",
        "model.encoders.image.weights=null",
        "--set",
        "model.encoders.image.options.width=4",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.eval_batch_size=8",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.device=cpu",
    ]


# ---------------------------------------------------------------------------------------------------- Sarcasm


@pytest.mark.slow
def test_sarcasm_prepares_splits_labels_tokens_images_and_trains(run_cli, registry, tmp_path, text_model):
    lines = make_sarcasm(tmp_path)
    result = run_cli("prepare", "sarcasm", "--raw", tmp_path, *small(text_model))
    assert "prepared sarcasm: 2 classes; train 6, val 2, test 2; text (2, 24), image (32, 32, 3)" in result.output
    dataset = PreparedDataset(registry / "datasets" / "sarcasm")
    tokenizer = load_tokenizer(str(text_model))
    for split, name in (("train", "train"), ("val", "valid2"), ("test", "test2")):
        arrays = dataset.split(split)
        rows = lines[name]
        assert np.load(dataset.path / split / "ids.npy").tolist() == [r[0] for r in rows]
        # valid/test use the annotator label (the last element) by default.
        assert arrays.labels.tolist() == [r[-1] for r in rows]
        assert np.array_equal(arrays.inputs["text"], tokenize(tokenizer, [r[1] for r in rows], 24))
        assert arrays.inputs["image"].dtype == np.uint8
        for row, values in zip(rows, arrays.inputs["image"], strict=True):
            assert np.abs(values[-2, -2].astype(int) - COLOURS[row[2]]).max() < 30  # the image of its own id
    assert dataset.split("val").labels.tolist() != [r[2] for r in lines["valid2"]]  # the two label columns differ
    row = DatasetRegistry(registry).get("sarcasm")
    assert row["splits"] == {"train": 6, "val": 2, "test": 2} and row["num_classes"] == 2

    run_cli(
        "prepare",
        "sarcasm",
        "--raw",
        tmp_path,
        *small(text_model),
        "-o",
        "eval_label=hashtag",
        "--name",
        "sarcasm-hashtag",
        "--silent",
    )
    hashtag = PreparedDataset(registry / "datasets" / "sarcasm-hashtag")
    assert hashtag.split("val").labels.tolist() == [r[2] for r in lines["valid2"]]

    assert "test_acc" in run_cli(*tiny_train("sarcasm", text_model)).output


def test_sarcasm_malformed_line_and_truncated_jpeg(run_cli, registry, tmp_path, text_model):
    lines = make_sarcasm(tmp_path)
    with open(tmp_path / "text" / "train.txt", "a") as handle:
        handle.write("['123', 'an unterminated string, 1]\n")
        handle.write("__import__('os').system('echo pwned')\n")
    result = run_cli("prepare", "sarcasm", "--raw", tmp_path, *small(text_model), "--silent", expect=1)
    assert f"{tmp_path / 'text' / 'train.txt'}:7: is not a Python literal list" in result.output
    truncate(tmp_path / "dataset_image" / f"{lines['test2'][1][0]}.jpg", 0.4)
    run_cli("prepare", "sarcasm", "--raw", tmp_path, *small(text_model), "--silent", "--skip-bad")
    manifest = json.loads((registry / "datasets" / "sarcasm" / "manifest.json").read_text())
    records = {r["id"]: r for r in manifest["bad_samples"]}
    assert set(records) == {"train.txt:7", "train.txt:8", lines["test2"][1][0]}
    assert "truncated" in records[lines["test2"][1][0]]["reason"].lower()
    assert manifest["splits"] == {"train": 6, "val": 2, "test": 1}
    assert DatasetRegistry(registry).get("sarcasm")["bad_samples"] == 3


def test_sarcasm_missing_folder_shows_layout(run_cli, registry, tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "train.txt").write_text("")
    result = run_cli("prepare", "sarcasm", "--raw", tmp_path, expect=1)
    assert "missing text/valid2.txt, text/test2.txt, dataset_image/" in result.output
    assert "['<id>', '<text>', <hashtag label>, <annotator label>]" in result.output


# ------------------------------------------------------------------------------------------------ Twitter2015


@pytest.mark.slow
def test_twitter2015_prepares_pairs_and_trains(run_cli, registry, tmp_path, text_model):
    rows = make_twitter2015(tmp_path)
    result = run_cli("prepare", "twitter2015", "--raw", tmp_path, *small(text_model))
    assert "prepared twitter2015: 3 classes; train 6, val 3, test 3; text (2, 24), image (32, 32, 3)" in result.output
    dataset = PreparedDataset(registry / "datasets" / "twitter2015")
    assert dataset.classes == ["negative", "neutral", "positive"]
    tokenizer = load_tokenizer(str(text_model))
    test = dataset.split("test")
    assert test.labels.tolist() == [r[1] for r in rows["test"]]
    sentences = [r[3].replace("$T$", r[4]) for r in rows["test"]]
    expected = tokenize(tokenizer, sentences, 24, [r[4] for r in rows["test"]])
    assert np.array_equal(test.inputs["text"], expected)
    assert "$" not in tokenizer.decode(test.inputs["text"][0, 0], skip_special_tokens=True)
    assert DatasetRegistry(registry).get("twitter2015")["splits"] == {"train": 6, "val": 3, "test": 3}
    assert "test_acc" in run_cli(*tiny_train("twitter2015", text_model)).output


def test_twitter2015_bad_header_bad_line_missing_image(run_cli, registry, tmp_path, text_model):
    make_twitter2015(tmp_path)
    text = (tmp_path / "dev.tsv").read_text().splitlines()
    (tmp_path / "dev.tsv").write_text("\n".join(["index\tlabel\timage\ttext"] + text[1:]) + "\n")
    result = run_cli("prepare", "twitter2015", "--raw", tmp_path, *small(text_model), expect=1)
    assert "dev.tsv: the first line must be the header" in result.output
    (tmp_path / "dev.tsv").write_text("\n".join([TWITTER_HEADER] + text[1:] + ["9\t7\tx.jpg\tsentence\ttarget"]) + "\n")
    result = run_cli("prepare", "twitter2015", "--raw", tmp_path, *small(text_model), "--silent", expect=1)
    assert f"{tmp_path / 'dev.tsv'}:5: has label '7', not 0, 1 or 2" in result.output
    missing = sorted((tmp_path / "twitter2015_images").iterdir())[0]
    missing.unlink()
    run_cli("prepare", "twitter2015", "--raw", tmp_path, *small(text_model), "--silent", "--skip-bad")
    manifest = json.loads((registry / "datasets" / "twitter2015" / "manifest.json").read_text())
    reasons = sorted(r["reason"] for r in manifest["bad_samples"])
    assert reasons[0].startswith("does not exist") and "not 0, 1 or 2" in reasons[1]
    assert manifest["splits"] == {"train": 5, "val": 3, "test": 3}


def test_text_model_that_cannot_be_loaded_is_a_clear_error(run_cli, registry, tmp_path):
    make_sarcasm(tmp_path, per_split={"train": 2, "valid2": 1, "test2": 1})
    result = run_cli("prepare", "sarcasm", "--raw", tmp_path, "--text-model", tmp_path / "no-such-model", expect=1)
    assert "cannot load the tokenizer of text model" in result.output and "local folder" in result.output
    assert not (registry / "datasets" / "sarcasm").exists()
