"""CLIP's encoders (§4.5, Table 5) on a tiny random-init CLIP saved to a temporary folder (nothing downloaded):
loading, shapes, CLIP's normalisation and pooling, gradients; the CLIP-tokenised Sarcasm/Twitter2015 preparation
and one epoch through the CLI; the refusal of a dataset tokenised for another text model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rawgen import make_sarcasm, make_tiny_text_model, make_twitter2015

from dmgl_cli.config import EncoderConfig, load_config
from dmgl_cli.data.media import load_tokenizer, tokenize
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.errors import DmglError
from dmgl_cli.models.clip import CLIP_MEAN, CLIP_STD
from dmgl_cli.models.encoders import build_encoder
from dmgl_cli.paths import recipes_dir

IMAGE = 32  # the tiny CLIP's image size
WORDS = (
    "oh great love monday traffic rain sunny coffee again just what i needed today user rt is awful here news "
    "obama apple lakers"
).split()


def make_tiny_clip(folder: Path) -> Path:
    """A random-init CLIPModel (hidden 32, 2 layers, 2 heads, 32 px images in 8 px patches) and a CLIP tokenizer
    whose byte-level BPE knows every byte and a few whole words, saved like ``save_pretrained``."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # merge each word left to right into one token
        merged = word[0]
        for position, char in enumerate(word[1:], start=1):
            piece = char + "</w>" if position == len(word) - 1 else char
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    pairs: Any = merges  # tokenizers takes (left, right) pairs; transformers' hint says strings
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)
    tokenizer.save_pretrained(folder)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "projection_dim": 16,
            "pad_token_id": tokenizer.pad_token_id,
            **special,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE,
            "patch_size": 8,
            "projection_dim": 16,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory) -> Path:
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


def encoder(name: str, weights, **options) -> EncoderConfig:
    return EncoderConfig(name=name, weights=str(weights) if weights else None, options=options)


def text_batch(folder: Path, texts: list[str], length: int, pairs: list[str] | None = None) -> torch.Tensor:
    return torch.from_numpy(tokenize(load_tokenizer(str(folder)), texts, length, pairs))


# ------------------------------------------------------------------------------------------------ encoders


def test_clip_vision_loads_normalises_with_clip_statistics_and_trains(clip_model):
    from transformers import CLIPVisionModelWithProjection

    spec = {"kind": "image", "dtype": "uint8", "shape": [IMAGE, IMAGE, 3]}
    model: Any = build_encoder(spec, encoder("clip_vision", clip_model), 8, 0.1).eval()
    images = torch.randint(0, 256, (3, IMAGE, IMAGE, 3), dtype=torch.uint8)
    features = model(images)
    assert features.shape == (3, 8)
    # By hand: [0, 1] pixels, CLIP's mean/std, the checkpoint's vision tower and projection, then the projection.
    reference = CLIPVisionModelWithProjection.from_pretrained(clip_model).eval()
    pixels = images.permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = model.project(reference(pixel_values=pixels).image_embeds)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)

    # Another stored size is resized to CLIP's; frames [T, H, W, 3] are averaged over time; gradients reach the tower.
    big: Any = build_encoder(
        {"kind": "image", "dtype": "uint8", "shape": [40, 40, 3]}, encoder("clip_vision", clip_model), 8, 0
    )
    big(torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)).pow(2).sum().backward()
    first = big.model.vision_model.embeddings.patch_embedding.weight.grad
    assert first is not None and first.abs().sum() > 0
    assert big.model.visual_projection.weight.grad is not None
    frames = {"kind": "video", "dtype": "uint8", "shape": [2, IMAGE, IMAGE, 3]}
    clip: Any = build_encoder(frames, encoder("clip_vision", clip_model, features="pooled"), 8, 0)
    assert clip(torch.randint(0, 256, (2, 2, IMAGE, IMAGE, 3), dtype=torch.uint8)).shape == (2, 8)
    assert clip.project.linear.in_features == 32  # the pooled class token, not the 16-wide projection


def test_clip_text_pools_like_clip_or_at_the_last_token_and_trains(clip_model):
    from transformers import CLIPTextModelWithProjection

    spec = {"kind": "text", "dtype": "int64", "shape": [2, 20]}
    texts, targets = ["oh great love monday traffic", "rain again"], ["obama", "apple"]
    single = text_batch(clip_model, texts, 20)
    model: Any = build_encoder(spec, encoder("clip_text", clip_model), 8, 0.1).eval()
    reference = CLIPTextModelWithProjection.from_pretrained(clip_model).eval()
    ids, mask = single[:, 0], single[:, 1]
    expected = model.project(reference(input_ids=ids, attention_mask=mask).text_embeds)
    torch.testing.assert_close(model(single), expected, rtol=1e-4, atol=1e-5)

    # pooling: last takes the state at the last attended token (the pair's final end-of-text), which sees the target.
    pair = text_batch(clip_model, texts, 20, targets)
    last: Any = build_encoder(spec, encoder("clip_text", clip_model, pooling="last"), 8, 0)
    hidden = reference.text_model(input_ids=pair[:, 0], attention_mask=pair[:, 1]).last_hidden_state
    ends = pair[:, 1].sum(dim=1) - 1
    assert (pair[torch.arange(2), 0, ends] == load_tokenizer(str(clip_model)).eos_token_id).all()
    expected = last.project(reference.text_projection(hidden[torch.arange(2), ends]))
    torch.testing.assert_close(last(pair), expected, rtol=1e-4, atol=1e-5)
    last(pair).sum().backward()
    grad = last.model.text_model.embeddings.token_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_clip_encoders_refuse_what_they_cannot_read(clip_model, bert_model):
    text = {"kind": "text", "dtype": "int64", "shape": [2, 20]}
    with pytest.raises(DmglError, match=r"stored as 128 tokens, but CLIP reads at most 77; .*-o max_tokens=77"):
        build_encoder({**text, "shape": [2, 128]}, encoder("clip_text", clip_model), 8, 0)
    with pytest.raises(DmglError, match=r"is a bert model, not CLIP"):
        build_encoder(text, encoder("clip_text", bert_model), 8, 0)
    with pytest.raises(DmglError, match=r"clip_vision encoder needs `weights`"):
        build_encoder({"kind": "image", "dtype": "uint8", "shape": [8, 8, 3]}, encoder("clip_vision", None), 8, 0)
    with pytest.raises(DmglError, match=r"takes RGB images"):
        build_encoder(
            {"kind": "audio", "dtype": "float16", "shape": [257, 99]}, encoder("clip_vision", clip_model), 8, 0
        )
    with pytest.raises(DmglError, match=r"option pooling must be one of eos, last"):
        build_encoder(text, encoder("clip_text", clip_model, pooling="cls"), 8, 0)
    with pytest.raises(DmglError, match=r"cannot load CLIP model"):
        build_encoder(text, encoder("clip_text", clip_model / "missing"), 8, 0)


# ----------------------------------------------------------------------------------- prepare and train


def clip_train(recipe: str, clip_model: Path, *extra: str) -> list[str]:
    settings = [
        f"model.encoders.text.weights={clip_model}",
        f"model.encoders.image.weights={clip_model}",
        "model.embed_dim=8",
        "train.batch_size=4",
        "train.eval_batch_size=8",
        "data.num_workers=0",
        "train.device=cpu",
    ]
    return [
        "train",
        "--recipe",
        recipe,
        "--epochs",
        "1",
        "--silent",
        *extra,
        *(a for s in settings for a in ("--set", s)),
    ]


def clip_prepare(dataset: str, raw: Path, clip_model: Path, name: str) -> list[str | Path]:
    return ["prepare", dataset, "--raw", raw, "--name", name, "--text-model", clip_model, "-o", "max_tokens=77"]


@pytest.mark.slow
def test_sarcasm_with_clip_tokens_prepares_trains_and_refuses_bert_tokens(
    run_cli, registry, tmp_path, clip_model, bert_model
):
    lines = make_sarcasm(tmp_path)
    result = run_cli(*clip_prepare("sarcasm", tmp_path, clip_model, "sarcasm-clip"), "-o", f"image_size={IMAGE}")
    assert "prepared sarcasm-clip: 2 classes; train 6, val 2, test 2; text (2, 77), image (32, 32, 3)" in result.output
    dataset = PreparedDataset(registry / "datasets" / "sarcasm-clip")
    extra = dataset.manifest["extra"]
    assert extra["text_model"] == str(clip_model)
    tokenizer = load_tokenizer(str(clip_model))
    assert extra["tokenizer"] == {"name": str(clip_model), "class": "CLIPTokenizer", "vocab_size": len(tokenizer)}
    test = dataset.split("test").inputs["text"]
    assert np.array_equal(test, tokenize(tokenizer, [r[1] for r in lines["test2"]], 77))
    assert test[0, 0, 0] == tokenizer.bos_token_id and tokenizer.eos_token_id in test[0, 0]

    result = run_cli(*clip_train("sarcasm-clip", clip_model, "--json"))
    final = json.loads(result.stdout)["seeds"][0]["final"]
    assert {"test_acc", "test_acc_image", "test_acc_text"} <= set(final)  # Table 5: multi, image, text

    # The same raw files tokenised for BERT must not feed the CLIP text tower, nor CLIP's tokens a BERT.
    run_cli("prepare", "sarcasm", "--raw", tmp_path, "--text-model", bert_model, "-o", "image_size=32", "--silent")
    result = run_cli(*clip_train("sarcasm-clip", clip_model, "--set", "dataset=sarcasm"), expect=1)
    assert f"dataset 'sarcasm' was tokenised with {bert_model} (BertTokenizer" in result.output
    assert "model.encoders.text.name is clip_text, which reads CLIP's tokens only" in result.output
    assert "`dmgl prepare sarcasm ... --name sarcasm-clip --text-model" in result.output
    assert "-o max_tokens=77`" in result.output
    result = run_cli(
        "train", "--recipe", "sarcasm", "--set", "dataset=sarcasm-clip", "--set", f"model.encoders.text.weights={bert_model}",
        "--set", "model.encoders.image.weights=null", "--set", "data.num_workers=0", "--silent", expect=1,
    )  # fmt: skip
    assert "dataset 'sarcasm-clip' was tokenised with" in result.output and "(CLIPTokenizer)" in result.output
    assert "model.encoders.text.name is bert, a BERT-family encoder; use clip_text" in result.output


def test_clip_tokens_beyond_77_are_refused_when_preparing(run_cli, registry, tmp_path, clip_model):
    make_sarcasm(tmp_path, per_split={"train": 2, "valid2": 1, "test2": 1})
    result = run_cli("prepare", "sarcasm", "--raw", tmp_path, "--text-model", clip_model, expect=1)
    assert "option max_tokens is 128, but the tokenizer of" in result.output
    assert "(CLIPTokenizer) takes at most 77 tokens; pass -o max_tokens=77" in result.output
    assert not (registry / "datasets" / "sarcasm").exists()


@pytest.mark.slow
def test_twitter2015_with_clip_pairs_trains_with_mla(run_cli, registry, tmp_path, clip_model):
    rows = make_twitter2015(tmp_path)
    run_cli(*clip_prepare("twitter2015", tmp_path, clip_model, "twitter2015-clip"), "-o", "image_size=40", "--silent")
    dataset = PreparedDataset(registry / "datasets" / "twitter2015-clip")
    assert dataset.modalities["text"]["shape"] == [2, 77] and dataset.modalities["image"]["shape"] == [40, 40, 3]
    tokenizer = load_tokenizer(str(clip_model))
    first = dataset.split("train").inputs["text"][0]
    tokens = tokenizer.convert_ids_to_tokens(first[0][: first[1].sum()].tolist())
    # <bos> sentence (target filled in) <eos> <eos> target <eos>: the pair the twitter2015-clip recipe pools at its end.
    assert tokens[0] == "<|startoftext|>" and tokens[-3:] == ["<|endoftext|>", "obama</w>", "<|endoftext|>"]
    assert rows["train"][0][4] == "Obama"
    result = run_cli(*clip_train("twitter2015-clip", clip_model, "--method", "mla", "--json"))
    assert "test_acc_image" in json.loads(result.stdout)["seeds"][0]["final"]


# ------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["sarcasm-clip", "twitter2015-clip"])
def test_clip_recipes_list_table5_commands_and_use_clip_towers(name):
    config = load_config(name, [])
    assert config.dataset == name
    text, image = config.model.encoders["text"], config.model.encoders["image"]
    assert (text.name, image.name) == ("clip_text", "clip_vision")
    assert text.weights == image.weights == "openai/clip-vit-base-patch32"
    assert (config.optim.name, config.optim.lr, config.train.batch_size) == ("adam", 1.0e-4, 128)  # §4.1
    header = (recipes_dir() / f"{name}.yaml").read_text().split("\ndataset:")[0]
    prepare = f"--name {name} --text-model openai/clip-vit-base-patch32 -o max_tokens=77"
    assert re.search(rf"^#   dmgl prepare {name.removesuffix('-clip')} --raw \S+ {prepare}", header, re.M)
    trains = re.findall(rf"^#   dmgl train --recipe {name} (.+?) --seeds 3 +# (.+)$", header, re.M)
    assert trains == [
        ("--strategy constant:0", "CLIP: Concat on CLIP's encoders"),
        ("--method mla", "CLIP+MLA"),
        ("--strategy lb", "CLIP+Ours (Ours-LB)"),
    ]


def test_training_on_an_unprepared_clip_dataset_points_to_the_recipe(run_cli):
    result = run_cli("train", "--recipe", "sarcasm-clip", "--silent", expect=1)
    assert "dataset 'sarcasm-clip' is not prepared" in result.output
    assert "run `dmgl prepare DATASET ... --name sarcasm-clip` first (`dmgl recipes show RECIPE`" in result.output
