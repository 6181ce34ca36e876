"""Kinetics-Sounds (Arandjelović & Zisserman 2017): the 31 Kinetics classes that can be heard; audio + video.

The paper (§4.1) uses 19,000 10-second clips: 15,000 train / 1,900 val / 1,900 test. Kinetics is distributed as
YouTube ids, so "the raw download" is whatever a downloader wrote: a folder of clips with their audio track, and
an annotation file naming each clip's label and split. Raw layout::

    <raw>/videos/<clip>.mp4 ...     10 s clips with audio; any container PyAV reads (mp4, mkv, webm, avi, flv),
                                    found recursively, matched by file name without extension
    <raw>/annotations.csv           a header row, then one row per clip

Accepted annotation columns (header names, any order, case-insensitive):

* ``clip,label,split`` — ``clip`` is the file name with or without extension (``id`` is accepted for ``clip``);
* ``youtube_id,time_start,time_end,label,split`` — Kinetics' own CSV; the clip is
  ``<youtube_id>_<time_start:06d>_<time_end:06d>``, the name the common Kinetics downloaders write.

``split`` takes train / val / test (also valid, validation, dev, training, testing). Or, as the lineage
(OGM-GE, PMR) distributes it, one ``id,label`` list per split, no annotation file needed:
``--split-file train=train.csv --split-file val=val.csv --split-file test=test.csv`` (val is optional: without
it the trainer carves one from train). ``-o annotations=PATH`` reads an annotation file elsewhere.

Classes: the distinct labels of the train split, sorted. Stored per clip: ``audio`` log-spectrogram
[257, 1004] (10 s at 16 kHz, decoded from the clip with PyAV; float16 by default — it halves ~20 GB to ~10 GB
and the log-magnitudes lose nothing that matters at float16's 1e-3 relative precision) and ``visual`` uint8
[10, 224, 224, 3] (10 frames spread evenly; about 1.5 MB a clip, ~28 GB for 19,000 clips; ``-o frame_size=112``
quarters it). Annotated clips without a file stop the run listing them (a YouTube download usually misses a
few), or are recorded and left out with ``--skip-bad``. ``-o seconds=S`` sets the audio length, or
``-o spectrogram_frames=N`` the spectrogram's width directly (257 x N). ``-o audio_store=pcm16`` keeps the 10 s of
samples as int16 instead (320 kB a clip against the float16 spectrogram's 516 kB; the spectrogram is computed when
a batch reads it, data/pcm_audio.py; the decoded AAC is rounded to 16 bits as a WAV of it would be).
"""

from __future__ import annotations

import csv
import functools
import io
from pathlib import Path
from typing import Any

from dmgl_cli.data.media import VIDEO_SUFFIXES, decode_audio, read_clip
from dmgl_cli.data.preparers import driver
from dmgl_cli.data.preparers.base import PrepareJob
from dmgl_cli.data.preparers.common import (
    audio_modality,
    audio_seconds,
    audio_store,
    check_layout,
    few,
    float_dtype,
    normalise_split,
    positive_int,
    raw_folder,
    read_id_label_csv,
    read_text_file,
    reject,
    split_files_option,
    visible_files,
)
from dmgl_cli.errors import DmglError

NAME = "kinetics-sounds"
VERSION = "1"
DESCRIPTION = "Kinetics-Sounds: 31 classes, audio (257x1004 spectrogram) + video (10 frames); 15,000 / 1,900 / 1,900"
OPTIONS = {
    "annotations": None,  # default <raw>/annotations.csv, unless --split-file lists are given
    "split_files": None,  # {split: id,label CSV} from --split-file SPLIT=PATH
    "video_folder": "videos",
    "seconds": 10.0,  # 10 s -> 257 x 1004
    "spectrogram_frames": None,  # or the spectrogram's width: N -> 257 x N, whatever length that takes
    "frames": 10,
    "frame_size": 224,
    "audio_dtype": "float16",
    "audio_store": "spectrogram",  # spectrogram (stored as is) | pcm16 (16-bit samples, spectrogram computed when read)
    "frame_store": "jpeg",  # raw (uint8 .npy) | jpeg (decoded per batch, only the sampled frames; bench/README.md)
    "frame_quality": 90,  # JPEG quality of frame_store=jpeg
}
LAYOUT = """  videos/<clip>.mp4 ...   10 s clips with audio (mp4, mkv, webm, avi, flv; found recursively)
  annotations.csv         header `clip,label,split` (or Kinetics' `youtube_id,time_start,time_end,label,split`)
  -- or, instead of annotations.csv, the lineage's lists: --split-file train=train.csv --split-file val=val.csv
     --split-file test=test.csv, rows `id,label`"""


def decode_clip(path: str, *, seconds: float, frames: int, size: int, audio_dtype: str, store: str) -> dict:
    return {"audio": decode_audio(path, seconds, store, audio_dtype), "visual": read_clip(path, frames, size)}


def _read_annotations(path: Path) -> list[tuple[str, str, str, str]]:
    """(clip, label, split, where) rows."""
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    rows = [(number, row) for number, row in enumerate(reader, start=2) if "".join(row).strip()]
    column = {name: header.index(name) for name in header}
    if "clip" not in column and "id" in column:
        column["clip"] = column["id"]
    youtube = all(k in column for k in ("youtube_id", "time_start", "time_end"))
    if not ({"label", "split"} <= set(column) and ("clip" in column or youtube)):
        raise DmglError(
            f"{path}: the header must name clip,label,split (or youtube_id,time_start,time_end,label,"
            f"split); found {','.join(header) or 'nothing'}"
        )
    out = []
    for number, row in rows:
        where = f"{path}:{number}"
        if len(row) < len(header):
            raise DmglError(f"{where}: {len(row)} fields, the header has {len(header)}")
        if "clip" in column:
            clip = row[column["clip"]].strip()
        else:
            try:
                start, end = int(float(row[column["time_start"]])), int(float(row[column["time_end"]]))
            except ValueError:
                raise DmglError(f"{where}: time_start/time_end must be numbers") from None
            clip = f"{row[column['youtube_id']].strip()}_{start:06d}_{end:06d}"
        label = row[column["label"]].strip()
        if not clip or not label:
            raise DmglError(f"{where}: empty clip or label")
        out.append((clip, label, normalise_split(row[column["split"]], where), where))
    if not out:
        raise DmglError(f"{path} lists no clips")
    return out


def prepare(job: PrepareJob) -> dict[str, Any]:
    raw = raw_folder(job, NAME, LAYOUT)
    folder = job.option("video_folder", str)
    files = split_files_option(job)
    annotations = job.options.get("annotations")
    if files is not None and annotations:
        raise DmglError("give either --split-file lists or -o annotations=..., not both")
    annotation_path = Path(str(annotations)).expanduser() if annotations else raw / "annotations.csv"
    check_layout(raw, [f"{folder}/"] + ([] if files or annotations else ["annotations.csv"]), NAME, LAYOUT)
    if annotations and not annotation_path.is_file():
        raise DmglError(f"annotation file {annotation_path} does not exist")
    seconds = audio_seconds(job, OPTIONS)
    frames = positive_int(job, "frames")
    size = positive_int(job, "frame_size", 8)
    audio_dtype = float_dtype(job)
    store = audio_store(job)

    if files is not None:
        entries = [
            (Path(clip).stem if Path(clip).suffix.lower() in VIDEO_SUFFIXES else clip, label, split, f"{path}")
            for split, path in files.items()
            for clip, label in read_id_label_csv(path, f"{split} list")
        ]
    else:
        entries = [
            (Path(c).stem if Path(c).suffix.lower() in VIDEO_SUFFIXES else c, label, split, where)
            for c, label, split, where in _read_annotations(annotation_path)
        ]
    seen: dict[str, str] = {}
    for clip, _, _, where in entries:
        if clip in seen:
            raise DmglError(f"{where}: clip {clip} is listed twice (also in {seen[clip]})")
        seen[clip] = where

    videos: dict[str, Path] = {}
    for path in visible_files(raw / folder, VIDEO_SUFFIXES, recursive=True):
        if path.stem in videos:
            raise DmglError(f"two clips named {path.stem}: {videos[path.stem]} and {path}; keep one")
        videos[path.stem] = path
    classes = sorted({label for _, label, split, _ in entries if split == "train"})
    if len(classes) < 2:
        raise DmglError(f"the train split names {len(classes)} class(es); Kinetics-Sounds has 31")
    unknown = sorted({label for _, label, _, _ in entries if label not in classes})
    if unknown:
        raise DmglError(f"labels in val/test that no train clip has: {few(unknown)}")
    missing = [clip for clip, *_ in entries if clip not in videos]
    if missing and not job.skip_bad:
        raise DmglError(
            f"{len(missing)} annotated clips have no video file under {raw / folder}: {few(missing)}. "
            "Download them, or re-run with --skip-bad to record them and leave them out"
        )

    known_bad: list[dict[str, Any]] = []
    samples, counts = [], {}
    for clip, label, split, where in entries:
        if clip not in videos:
            reject(
                job,
                known_bad,
                split=split,
                ident=clip,
                path=raw / folder / f"{clip}.mp4",
                reason=f"has no video file (listed at {where})",
            )
            continue
        index = counts.get(split, 0)
        counts[split] = index + 1
        samples.append(driver.Sample(split, index, classes.index(label), clip, str(videos[clip])))
    plan = driver.Plan(
        samples=samples,
        classes=classes,
        decoded={
            "audio": audio_modality(seconds, audio_dtype, store),
            "visual": driver.Modality(
                "video", (frames, size, size, 3), "uint8", **driver.frame_store(job, "video", (frames, size, size, 3))
            ),
        },
        decode=functools.partial(
            decode_clip, seconds=seconds, frames=frames, size=size, audio_dtype=audio_dtype, store=store
        ),
        known_bad=known_bad,
        extra={"annotations": "split files" if files else str(annotation_path)},
    )
    return driver.run(job, plan, preparer=NAME, version=VERSION)
