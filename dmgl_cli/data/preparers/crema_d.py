"""CREMA-D (Cao et al. 2014): 7,442 clips of 91 actors, six emotions; audio + video (§4.1).

Raw layout (the public distribution)::

    <raw>/AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav     e.g. 1001_DFA_ANG_XX.wav
    <raw>/VideoFlash/<same name>.flv

Classes, in this order: ANG DIS FEA HAP NEU SAD (the emotion field of the file name).

Split: 6,698 train / 744 test as in the paper — by default an exact, seeded split stratified by emotion
(744/7,442 of the clips, ``--seed``); or the lineage's split files, ``--split-file train=train.csv --split-file
test=test.csv`` (``clip_id,label`` rows, optional header, e.g. ``1001_DFA_ANG_XX,ANG``). There is no validation
split: the trainer carves one from train (``data.val_fraction``, seeded, stratified).

Stored per clip (about 165 kB, 0.94x the authors' JPEGs + WAV; bench/README.md): ``audio``, the 3 s of 16 kHz
samples the log-spectrogram [257, 299] is computed from, as int16 (96 kB, lossless for CREMA-D's 16-bit WAVs),
the spectrogram computed when a batch reads it (``-o audio_store=pcm16``, data/pcm_audio.py; ``-o
audio_store=spectrogram`` stores the spectrogram itself, 307 kB in float32, 154 kB with ``-o audio_dtype=float16``);
and ``visual``, 10 frames spread evenly over the FLV clip as JPEG (224 x 224, quality 90, ~69 kB; ``-o
frame_store=raw``: uint8 [10, 224, 224, 3]), 3 of which are sampled at train time. Either way the model sees the
spectrogram, float32 [257, 299] (see :mod:`dmgl_cli.data.media`). A clip whose video is missing or unreadable is a
bad sample like a corrupt WAV.

The spectrogram's width is set by the audio length, ``-o seconds=S`` (repeated or cut to it), or directly by
``-o spectrogram_frames=N`` (257 x N): the authors' OGM-GE loop uses 257 x 188, ``-o spectrogram_frames=188``
(with pcm16, the samples stored follow: 30,245 a clip).

Version 2: pcm16 became the default audio store (version 1 stored the spectrogram).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from dmgl_cli.data.media import BadSample, decode_audio, read_clip
from dmgl_cli.data.preparers import driver
from dmgl_cli.data.preparers.base import PrepareJob
from dmgl_cli.data.preparers.common import (
    audio_modality,
    audio_seconds,
    audio_store,
    check_layout,
    exact_stratified_split,
    few,
    float_dtype,
    positive_float,
    positive_int,
    raw_folder,
    read_id_label_csv,
    split_files_option,
)
from dmgl_cli.errors import DmglError

NAME = "crema-d"
VERSION = "2"
DESCRIPTION = "CREMA-D: 6 emotions, audio (257x299 spectrogram) + video (10 frames); 6,698 train / 744 test"
CLASSES = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
PAPER_TEST_FRACTION = 744 / 7442
OPTIONS = {
    "seconds": 3.0,  # audio length: repeated or cut to this (3 s -> 257 x 299)
    "spectrogram_frames": None,  # or the spectrogram's width: N -> 257 x N (188: the authors' 257 x 188)
    "frames": 10,  # frames kept per clip, spread evenly
    "frame_size": 224,  # frames resized to frame_size x frame_size
    "audio_store": "pcm16",  # pcm16 (16-bit samples, spectrogram computed when read) | spectrogram (stored as is)
    "audio_dtype": "float32",  # the spectrogram's dtype; with audio_store=spectrogram, float16 halves the disk space
    "test_fraction": PAPER_TEST_FRACTION,  # seeded stratified split: 744 of 7,442 clips
    "video_folder": "VideoFlash",
    "video_suffix": ".flv",
    "split_files": None,  # {split: clip_id,label CSV} from --split-file SPLIT=PATH
    "frame_store": "jpeg",  # raw (uint8 .npy) | jpeg (decoded per batch, only the sampled frames; bench/README.md)
    "frame_quality": 90,  # JPEG quality of frame_store=jpeg
}
LAYOUT = """  AudioWAV/1001_DFA_ANG_XX.wav ...   (<actor>_<sentence>_<emotion>_<level>.wav)
  VideoFlash/1001_DFA_ANG_XX.flv ...  (same names)"""
_CLIP = re.compile(r"^\d+_[A-Za-z0-9]+_([A-Z]{3})_[A-Za-z0-9]+$")


def decode_clip(
    source: tuple[str, str], *, seconds: float, frames: int, size: int, audio_dtype: str, store: str
) -> dict:
    wav, video = source
    if not Path(video).is_file():
        raise BadSample(video, "is missing (every clip needs its video)")
    return {
        "audio": decode_audio(wav, seconds, store, audio_dtype),
        "visual": read_clip(video, frames, size),
    }


def _clips(raw: Path) -> dict[str, int]:
    clips: dict[str, int] = {}
    odd = []
    for path in sorted((raw / "AudioWAV").iterdir()):
        if path.name.startswith(".") or path.suffix.lower() != ".wav":
            continue
        match = _CLIP.match(path.stem)
        if not match or match.group(1) not in CLASSES:
            odd.append(path.name)
            continue
        clips[path.stem] = CLASSES.index(match.group(1))
    if odd:
        raise DmglError(
            f"{raw / 'AudioWAV'}: file names not of the form <actor>_<sentence>_<emotion>_<level>.wav "
            f"with an emotion in {' '.join(CLASSES)}: {few(odd)}; move them out of the folder"
        )
    if not clips:
        raise DmglError(f"{raw / 'AudioWAV'} holds no .wav clips")
    return clips


def _split(job: PrepareJob, clips: dict[str, int]) -> dict[str, list[str]]:
    files = split_files_option(job)
    if files is None:
        fraction = positive_float(job, "test_fraction")
        if fraction >= 1:
            raise DmglError(f"option test_fraction must be in (0, 1), got {fraction}")
        names = sorted(clips)
        held_out = max(1, int(round(fraction * len(names))))
        kept, held = exact_stratified_split([clips[n] for n in names], held_out, job.seed)
        return {"train": [names[i] for i in kept], "test": [names[i] for i in held]}
    splits: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for split, path in files.items():
        rows = read_id_label_csv(path, f"split file for {split}")
        unknown = [clip for clip, _ in rows if Path(clip).stem not in clips]
        if unknown:
            raise DmglError(f"{path}: clips not found in AudioWAV/: {few(unknown)}")
        names = []
        for clip, label in rows:
            clip = Path(clip).stem
            if label.upper() in CLASSES and CLASSES.index(label.upper()) != clips[clip]:
                raise DmglError(f"{path}: {clip} is labelled {label} but its file name says {CLASSES[clips[clip]]}")
            if clip in seen:
                raise DmglError(f"{path}: {clip} is listed in both the {seen[clip]} and the {split} split files")
            seen[clip] = split
            names.append(clip)
        splits[split] = sorted(names)
    return splits


def prepare(job: PrepareJob) -> dict:
    raw = raw_folder(job, NAME, LAYOUT)
    video_folder = job.option("video_folder", str)
    suffix = job.option("video_suffix", str)
    check_layout(raw, ["AudioWAV/", f"{video_folder}/"], NAME, LAYOUT)
    seconds = audio_seconds(job, OPTIONS)
    frames = positive_int(job, "frames")
    size = positive_int(job, "frame_size", 8)
    audio_dtype = float_dtype(job)
    store = audio_store(job)
    clips = _clips(raw)
    splits = _split(job, clips)
    samples = [
        driver.Sample(
            split,
            index,
            clips[clip],
            clip,
            (str(raw / "AudioWAV" / f"{clip}.wav"), str(raw / video_folder / f"{clip}{suffix}")),
        )
        for split, names in splits.items()
        for index, clip in enumerate(names)
    ]
    plan = driver.Plan(
        samples=samples,
        classes=CLASSES,
        decoded={
            "audio": audio_modality(seconds, audio_dtype, store),
            "visual": driver.Modality(
                "video", (frames, size, size, 3), "uint8", **driver.frame_store(job, "video", (frames, size, size, 3))
            ),
        },
        decode=functools.partial(
            decode_clip, seconds=seconds, frames=frames, size=size, audio_dtype=audio_dtype, store=store
        ),
        extra={
            "split": "split files" if split_files_option(job) else f"seeded stratified (seed {job.seed})",
            "class_counts": {c: int(np.sum([clips[n] == i for n in clips])) for i, c in enumerate(CLASSES)},
        },
    )
    return driver.run(job, plan, preparer=NAME, version=VERSION)
