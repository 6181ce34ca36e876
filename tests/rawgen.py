"""Tiny raw datasets in the real public layouts and file formats, for the preparer tests.

WAV through soundfile, FLV / MP4 / AVI through PyAV (FLV1 + MP3, MPEG-4 + AAC, MPEG-4 in AVI), JPEG through
Pillow, and the exact list / TSV / text formats each dataset ships. Content depends on the class (a tone
frequency, a colour), so the files are distinguishable, and everything is small enough to write in a second.
"""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

SR = 16_000


def tone(seconds: float, freq: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.01
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_wav(path: Path, seconds: float, freq: float, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, tone(seconds, freq, sr), sr, subtype="PCM_16")
    return path


def frame_image(index: int, colour: tuple[int, int, int], width: int, height: int) -> np.ndarray:
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[...] = colour
    x = (index * 3) % max(1, width - 8)  # a block moving right, so that frames (and optical flow) differ
    frame[height // 4 : 3 * height // 4, x : x + 8] = 255 - np.asarray(colour, dtype=np.uint8)
    return frame


def write_video(
    path: Path,
    frames: int,
    colour: tuple[int, int, int],
    *,
    width: int = 32,
    height: int = 24,
    fps: int = 10,
    audio_seconds: float | None = None,
    freq: float = 440.0,
    gray_levels: bool = False,
) -> Path:
    """A clip in the container named by the suffix: .flv (FLV1 + MP3), .mp4 (MPEG-4 + AAC), .avi (MPEG-4)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    codec = {".flv": "flv", ".mp4": "mpeg4", ".avi": "mpeg4"}[suffix]
    audio_codec = {".flv": "libmp3lame", ".mp4": "aac"}.get(suffix)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        audio_stream = None
        if audio_seconds is not None:
            rate = 22_050 if suffix == ".flv" else 16_000
            audio_stream = container.add_stream(audio_codec, rate=rate)
            audio_stream.layout = "mono"
        for index in range(frames):
            image = frame_image(index, colour, width, height)
            if gray_levels:
                image[...] = image.mean(axis=2, keepdims=True).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            rate = audio_stream.codec_context.sample_rate
            samples = tone(audio_seconds, freq, rate)
            chunk = audio_stream.codec_context.frame_size or 1024
            fmt = audio_stream.codec_context.format.name
            for begin in range(0, samples.size, chunk):
                piece = np.zeros(chunk, dtype=np.float32)
                part = samples[begin : begin + chunk]
                piece[: part.size] = part
                frame = av.AudioFrame.from_ndarray(
                    piece.reshape(1, -1), format="fltp" if fmt == "fltp" else "flt", layout="mono"
                )
                frame.sample_rate = rate
                frame.pts = begin
                frame.time_base = Fraction(1, rate)
                for packet in audio_stream.encode(frame):
                    container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)
    return path


def write_jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    image[...] = colour
    image[: size[1] // 2, : size[0] // 2] = 255 - np.asarray(colour, dtype=np.uint8)
    Image.fromarray(image).save(path, format="JPEG", quality=90)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])


def corrupt_wav(path: Path) -> None:
    """A file with a .wav name whose header is garbage."""
    path.write_bytes(b"RIFX\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(64))


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


# ---------------------------------------------------------------------------------------------------- CREMA-D

CREMA_EMOTIONS = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]


def make_crema_d(root: Path, per_class: int = 3, frames: int = 12, audio_seconds: float = 1.2) -> list[str]:
    """AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav and VideoFlash/<same>.flv; returns the clip ids."""
    clips = []
    for e, emotion in enumerate(CREMA_EMOTIONS):
        for k in range(per_class):
            clip = f"10{k + 1:02d}_DFA_{emotion}_XX"
            write_wav(root / "AudioWAV" / f"{clip}.wav", audio_seconds, 200 + 100 * e)
            write_video(root / "VideoFlash" / f"{clip}.flv", frames, COLOURS[e])
            clips.append(clip)
    return clips


# ------------------------------------------------------------------------------------------- Kinetics-Sounds

KS_CLASSES = ["playing bagpipes", "playing drums", "singing"]


def make_kinetics_sounds(
    root: Path, per_split: dict[str, int] | None = None, frames: int = 12, audio_seconds: float = 2.0
) -> list[dict[str, str]]:
    """videos/<clip>.mp4 (video + AAC audio) and annotations.csv (``clip,label,split``)."""
    per_split = per_split or {"train": 3, "val": 1, "test": 1}
    rows = []
    for c, label in enumerate(KS_CLASSES):
        for split, count in per_split.items():
            for k in range(count):
                clip = f"yt{c}{split[:2]}{k}_000010_000020"
                write_video(
                    root / "videos" / f"{clip}.mp4", frames, COLOURS[c], audio_seconds=audio_seconds, freq=300 + 150 * c
                )
                rows.append({"clip": clip, "label": label, "split": split})
    with open(root / "annotations.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["clip", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


# --------------------------------------------------------------------------------------------------- Sarcasm


def make_sarcasm(root: Path, per_split: dict[str, int] | None = None) -> dict[str, list[list]]:
    """text/train.txt, text/valid2.txt, text/test2.txt (one Python-literal list per line) and dataset_image/."""
    per_split = per_split or {"train": 6, "valid2": 2, "test2": 2}
    words = ["great", "love", "monday", "traffic", "rain", "sunny", "coffee", "again"]
    lines: dict[str, list[list]] = {}
    next_id = 682716753374351360
    for split, count in per_split.items():
        rows = []
        for k in range(count):
            label = k % 2
            text = f"oh {words[k % len(words)]} , just what i needed ' today # {words[(k + 3) % len(words)]} <user>"
            ident = str(next_id)
            next_id += 1
            row = [ident, text, label] if split == "train" else [ident, text, label, 1 - label if k == 0 else label]
            rows.append(row)
            write_jpeg(root / "dataset_image" / f"{ident}.jpg", COLOURS[label], size=(48, 36))
        (root / "text").mkdir(parents=True, exist_ok=True)
        (root / "text" / f"{split}.txt").write_text("".join(repr(row) + "\n" for row in rows))
        lines[split] = rows
    return lines


# ----------------------------------------------------------------------------------------------- Twitter2015

TWITTER_HEADER = "index\t#1 Label\t#2 ImageID\t#3 String\t#3 String"


def make_twitter2015(root: Path, per_split: dict[str, int] | None = None) -> dict[str, list[tuple]]:
    """train.tsv, dev.tsv, test.tsv (TomBERT's format) and twitter2015_images/."""
    per_split = per_split or {"train": 6, "dev": 3, "test": 3}
    targets = ["Obama", "Apple", "Lakers"]
    out: dict[str, list[tuple]] = {}
    image = 1860693
    for split, count in per_split.items():
        rows = []
        for k in range(count):
            label = k % 3
            target = targets[k % len(targets)]
            sentence = f'RT @user : $T$ is "{["awful", "here", "great"][label]}" today #news'
            image_id = f"{image}.jpg"
            image += 1
            write_jpeg(root / "twitter2015_images" / image_id, COLOURS[label])
            rows.append((k, label, image_id, sentence, target))
        with open(root / f"{split}.tsv", "w", newline="") as handle:
            handle.write(TWITTER_HEADER + "\n")
            for row in rows:
                handle.write("\t".join(str(v) for v in row) + "\n")
        out[split] = rows
    return out


# ------------------------------------------------------------------------------------------------- NVGesture


def nvgesture_line(class_id: int, subject: int, repeat: int, start: int, end: int) -> str:
    path = f"./Video_data/class_{class_id:02d}/subject{subject}_r{repeat}"
    return (
        f"path:{path} depth:sk_depth:{start}:{end} color:sk_color:{start}:{end} "
        f"duo_left:duo_left:{start}:{end} label:{class_id}"
    )


def make_nvgesture(
    root: Path,
    classes: int = 3,
    train_per_class: int = 2,
    test_per_class: int = 1,
    frames: int = 14,
    start: int = 2,
    end: int = 12,
) -> dict[str, list[str]]:
    """Video_data/class_XX/subjectN_rM/{sk_color,sk_depth}.avi and the two .lst files (labels 1-based)."""
    lists: dict[str, list[str]] = {"train": [], "test": []}
    subject = 1
    for class_id in range(1, classes + 1):
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for repeat in range(count):
                folder = root / "Video_data" / f"class_{class_id:02d}" / f"subject{subject}_r{repeat}"
                write_video(folder / "sk_color.avi", frames, COLOURS[class_id - 1], width=40, height=30)
                write_video(
                    folder / "sk_depth.avi", frames, COLOURS[class_id - 1], width=40, height=30, gray_levels=True
                )
                lists[split].append(nvgesture_line(class_id, subject, repeat, start, end))
            subject += 1
    for split, lines in lists.items():
        (root / f"nvgesture_{split}_correct_cvpr2016_v2.lst").write_text("\n".join(lines) + "\n")
    return lists


# ----------------------------------------------------------------------------------------------- text model


def make_tiny_text_model(folder: Path) -> Path:
    """A random-init BERT with a tiny word-piece vocabulary, saved like ``save_pretrained`` (tokenizer too)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        set(
            "oh great love monday traffic rain sunny coffee again just what i needed today # < > user rt @ : is "
            "awful here news obama apple lakers , ' \" . a the it".split()
        )
    )
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=160,
    )
    BertModel(config).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- driver tests


def decode_logged(source: tuple[int, str], *, log: str, fail: str) -> dict[str, np.ndarray]:
    """A decode function for the driver's tests (here, not in the test module, so that worker processes import
    nothing heavy): appends each sample to ``log``; sample 3 is bad while the file ``fail`` exists."""
    from dmgl_cli.data.media import BadSample

    value, name = source
    with open(log, "a") as handle:
        handle.write(f"{value}\n")
    if value == 3 and Path(fail).exists():
        raise BadSample(name, "is broken")
    return {"x": np.full((2,), value, dtype=np.float32)}
