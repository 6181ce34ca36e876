"""A dataset of your own: a CSV manifest with one row per sample.

    dmgl prepare custom --manifest samples.csv --modality voice=audio --modality face=video --name my-data
    dmgl train --recipe custom --set dataset=my-data

The manifest has a header row and

* a label column (``label``; ``-o label_column=...``), any strings — classes are the distinct values, in
  numeric order when they are all integers, else alphabetical;
* optionally a split column (``split``: train / val / test, also valid, validation, dev) — without it a test split
  of ``test_fraction`` (default 0.2) is held out, seeded and stratified, and the trainer carves validation from
  train;
* optionally an id column (``id``) naming each sample in messages and in ``<split>/ids.npy``;
* one column per modality. Its kind is declared with ``--modality COLUMN=KIND`` or in a YAML file
  (``-o spec=modalities.yaml``, see below):

  - ``audio``: a path to an audio file (WAV, FLAC, OGG, MP3 via librosa) or a video whose audio track is used
    (PyAV) -> log-spectrogram [257, frames] of ``audio_seconds`` (3 s -> 257 x 299), or 257 x N given
    ``-o audio_spectrogram_frames=N`` (the length that gives N columns, e.g. 188 for 257 x 188); stored as is, or
    with ``-o audio_store=pcm16`` as the clip's 16 kHz samples in int16 (a third of the float32 spectrogram's
    bytes; computed into the spectrogram when read, data/pcm_audio.py; lossless for 16-bit 16 kHz sources, others
    rounded to 16 bits as a WAV of them would be);
  - ``video``: a path to a video -> ``frames`` frames spread evenly, ``frame_size`` square, uint8;
  - ``image``: a path to an image -> ``image_size`` square RGB, uint8;
  - ``text``: a path to a ``.txt`` file (read as UTF-8), or else the text itself -> ``max_tokens`` token ids and
    mask from the tokenizer of ``--text-model``.

  Relative paths are resolved against ``--raw`` when given, else against the manifest's folder.

The YAML form sets kinds and per-modality settings (anything not given falls back to the ``-o`` options)::

    label: emotion            # label column (default: label)
    split: fold               # split column (default: split, if present)
    id: clip                  # id column (default: id, if present)
    modalities:
      voice: {kind: audio, seconds: 3}     # or {kind: audio, spectrogram_frames: 188}: 257 x 188
      face: {kind: video, frames: 10, size: 112}
      caption: {kind: text, max_tokens: 64}
      photo: {kind: image, size: 224}
"""

from __future__ import annotations

import csv
import functools
import io
from pathlib import Path
from typing import Any

import yaml

from dmgl_cli.data.media import (
    BadSample,
    decode_audio,
    load_image,
    load_tokenizer,
    read_clip,
    seconds_for_frames,
    tokenize,
)
from dmgl_cli.data.preparers import driver
from dmgl_cli.data.preparers.base import PrepareJob
from dmgl_cli.data.preparers.common import (
    audio_modality,
    audio_seconds,
    audio_store,
    class_order,
    exact_stratified_split,
    float_dtype,
    normalise_split,
    positive_float,
    positive_int,
    read_text_file,
    reject,
    tokenizer_record,
)
from dmgl_cli.errors import DmglError

NAME = "custom"
VERSION = "1"
DESCRIPTION = "your own data: a CSV manifest (label, optional split, one column per modality: files or text)"
KINDS = ("audio", "video", "image", "text")
OPTIONS = {
    "manifest": None,  # the CSV (or --manifest)
    "modalities": None,  # {column: kind} (or --modality COLUMN=KIND)
    "spec": None,  # a YAML file with label/split/id columns and per-modality kinds and settings
    "label_column": "label",
    "split_column": "split",
    "id_column": "id",
    "test_fraction": 0.2,  # held out (seeded, stratified) when the manifest has no split column
    "audio_seconds": 3.0,
    "audio_spectrogram_frames": None,  # or the spectrogram's width: N -> 257 x N
    "audio_dtype": "float32",
    "audio_store": "spectrogram",  # spectrogram (stored as is) | pcm16 (16-bit samples, spectrogram computed when read)
    "frames": 10,
    "frame_size": 224,
    "image_size": 224,
    "text_model": "bert-base-uncased",  # tokenizer: local folder or hub id (or --text-model)
    "max_tokens": 128,
}
_SETTINGS = {
    "audio": {"seconds", "spectrogram_frames"},
    "video": {"frames", "size"},
    "image": {"size"},
    "text": {"max_tokens"},
}


def _modality_plan(job: PrepareJob) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({column: {kind, settings...}}, {label/split/id: column}) from --modality or the YAML spec."""
    columns = {
        "label": job.option("label_column", str),
        "split": job.option("split_column", str),
        "id": job.option("id_column", str),
    }
    declared: dict[str, Any] = {}
    if job.options.get("spec"):
        path = Path(str(job.options["spec"])).expanduser()
        if not path.is_file():
            raise DmglError(f"modality spec {path} does not exist")
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DmglError(f"modality spec {path} is not valid YAML: {exc}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("modalities"), dict):
            raise DmglError(f"modality spec {path} needs a `modalities:` mapping of column -> {{kind: ...}}")
        unknown = sorted(set(spec) - {"label", "split", "id", "modalities"})
        if unknown:
            raise DmglError(
                f"modality spec {path}: unknown keys {', '.join(unknown)} (valid: label, split, id, modalities)"
            )
        for key in ("label", "split", "id"):
            if spec.get(key) is not None:
                columns[key] = str(spec[key])
        declared.update(spec["modalities"])
    if job.options.get("modalities"):
        given = job.options["modalities"]
        if not isinstance(given, dict):
            raise DmglError("option modalities must map columns to kinds, e.g. --modality voice=audio")
        declared.update({str(k): {"kind": v} for k, v in given.items()})
    if not declared:
        raise DmglError(
            "`dmgl prepare custom` needs the manifest's modality columns and their kinds: "
            "--modality COLUMN=KIND (audio, video, image, text), or -o spec=FILE.yaml"
        )
    modalities: dict[str, dict[str, Any]] = {}
    for column, entry in declared.items():
        if isinstance(entry, str):
            entry = {"kind": entry}
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
            raise DmglError(f"modality {column}: kind must be one of {', '.join(KINDS)}, got {entry!r}")
        kind = entry["kind"]
        extra = sorted(set(entry) - {"kind"} - _SETTINGS[kind])
        if extra:
            raise DmglError(
                f"modality {column} ({kind}): unknown settings {', '.join(extra)} "
                f"(valid: {', '.join(sorted(_SETTINGS[kind]))})"
            )
        modalities[column] = dict(entry)
    return modalities, columns


def _setting(entry: dict[str, Any], key: str, default: Any, column: str, integer: bool = True) -> Any:
    value = entry.get(key, default)
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise DmglError(
            f"modality {column}: {key} must be a positive {'integer' if integer else 'number'}, got {value!r}"
        )
    return value


def decode_row(source: tuple, *, settings: dict[str, dict[str, Any]]) -> dict:
    out = {}
    for column, path in source:
        entry = settings[column]
        if not Path(path).is_file():
            raise BadSample(path, f"does not exist (column {column})")
        if entry["kind"] == "audio":
            out[column] = decode_audio(path, entry["seconds"], entry["store"], entry["dtype"])
        elif entry["kind"] == "video":
            out[column] = read_clip(path, entry["frames"], entry["size"])
        else:
            out[column] = load_image(path, entry["size"])
    return out


def prepare(job: PrepareJob) -> dict:
    if not job.options.get("manifest"):
        raise DmglError(
            "`dmgl prepare custom` needs --manifest FILE.csv (one row per sample: a label column, "
            "optionally a split column, one column per modality)"
        )
    manifest = Path(str(job.options["manifest"])).expanduser().resolve()
    if not manifest.is_file():
        raise DmglError(f"manifest {manifest} does not exist")
    base = Path(job.raw) if job.raw else manifest.parent
    modalities, columns = _modality_plan(job)
    audio_dtype = float_dtype(job)
    store = audio_store(job)
    for column, entry in modalities.items():
        kind = entry["kind"]
        if kind == "audio":
            if "spectrogram_frames" in entry:
                if "seconds" in entry:
                    raise DmglError(f"modality {column}: give seconds or spectrogram_frames, not both")
                entry["seconds"] = seconds_for_frames(_setting(entry, "spectrogram_frames", None, column))
            else:
                default = audio_seconds(job, OPTIONS, "audio_seconds", "audio_spectrogram_frames")
                entry["seconds"] = float(_setting(entry, "seconds", default, column, False))
            entry["dtype"] = audio_dtype
            entry["store"] = store
        elif kind == "video":
            entry["frames"] = _setting(entry, "frames", positive_int(job, "frames"), column)
            entry["size"] = _setting(entry, "size", positive_int(job, "frame_size", 8), column)
        elif kind == "image":
            entry["size"] = _setting(entry, "size", positive_int(job, "image_size", 8), column)
        else:
            entry["max_tokens"] = _setting(entry, "max_tokens", positive_int(job, "max_tokens", 2), column)

    reader = csv.DictReader(io.StringIO(read_text_file(manifest), newline=""))
    header = reader.fieldnames or []
    rows = [(number, row) for number, row in enumerate(reader, start=2)]
    needed = [columns["label"], *modalities]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DmglError(f"{manifest}: no column {', '.join(missing)} (its columns: {', '.join(header) or 'none'})")
    if not rows:
        raise DmglError(f"{manifest} lists no samples")
    has_split = columns["split"] in header
    has_id = columns["id"] in header

    known_bad: list[dict[str, Any]] = []
    kept_rows = []
    for number, row in rows:
        ident = (row.get(columns["id"]) or "").strip() if has_id else f"row{number}"
        split = normalise_split(row[columns["split"]], f"{manifest}:{number}") if has_split else ""
        where = f"{manifest}:{number}"
        label = (row.get(columns["label"]) or "").strip()
        if not label:
            reject(job, known_bad, split=split, ident=ident, path=where, reason="has no label")
            continue
        empty = [c for c in modalities if not (row.get(c) or "").strip()]
        if empty:
            reject(job, known_bad, split=split, ident=ident, path=where, reason=f"has no value for {', '.join(empty)}")
            continue
        values, texts, broken = [], {}, None
        for column, entry in modalities.items():
            cell = row[column].strip()
            if entry["kind"] != "text":
                path = Path(cell).expanduser()
                values.append((column, str(path if path.is_absolute() else base / path)))
            elif cell.lower().endswith(".txt"):
                path = Path(cell).expanduser()
                path = path if path.is_absolute() else base / path
                try:
                    texts[column] = path.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    broken = (path, f"cannot be read as UTF-8 text ({exc})")
                    break
            else:
                texts[column] = cell
        if broken:
            reject(job, known_bad, split=split, ident=ident, path=broken[0], reason=broken[1])
            continue
        kept_rows.append({"ident": ident, "split": split, "label": label, "files": tuple(values), "texts": texts})
    if not kept_rows:
        raise DmglError(f"{manifest}: no usable samples")

    classes = class_order(r["label"] for r in kept_rows)
    if len(classes) < 2:
        raise DmglError(
            f"{manifest}: the label column {columns['label']!r} has one class ({classes[0]}); "
            "a classifier needs at least two"
        )
    if not has_split:
        fraction = positive_float(job, "test_fraction")
        if fraction >= 1:
            raise DmglError(f"option test_fraction must be in (0, 1), got {fraction}")
        held_out = max(1, int(round(fraction * len(kept_rows))))
        _, held = exact_stratified_split([classes.index(r["label"]) for r in kept_rows], held_out, job.seed)
        held_set = set(held.tolist())
        for position, row in enumerate(kept_rows):
            row["split"] = "test" if position in held_set else "train"

    samples, by_split = [], {}
    for row in kept_rows:
        index = by_split.setdefault(row["split"], [])
        samples.append(driver.Sample(row["split"], len(index), classes.index(row["label"]), row["ident"], row["files"]))
        index.append(row)

    decoded = {}
    for column, entry in modalities.items():
        kind = entry["kind"]
        if kind == "audio":
            decoded[column] = audio_modality(entry["seconds"], entry["dtype"], entry["store"])
        elif kind == "video":
            decoded[column] = driver.Modality("video", (entry["frames"], entry["size"], entry["size"], 3), "uint8")
        elif kind == "image":
            decoded[column] = driver.Modality("image", (entry["size"], entry["size"], 3), "uint8")
    text_columns = [c for c, e in modalities.items() if e["kind"] == "text"]
    fixed: dict[str, dict[str, Any]] = {}
    fixed_modalities = {}
    text_model = record = None
    if text_columns:
        text_model = job.option("text_model", str)
        tokenizer = load_tokenizer(text_model)
        record = tokenizer_record(tokenizer, text_model, max(modalities[c]["max_tokens"] for c in text_columns))
        for column in text_columns:
            length = modalities[column]["max_tokens"]
            fixed_modalities[column] = driver.Modality("text", (2, length), "int64")
            for split, split_rows in by_split.items():
                fixed.setdefault(split, {})[column] = tokenize(
                    tokenizer, [r["texts"][column] for r in split_rows], length
                )
    plan = driver.Plan(
        samples=samples,
        classes=classes,
        decoded=decoded,
        decode=functools.partial(decode_row, settings={c: e for c, e in modalities.items() if c in decoded}),
        fixed=fixed,
        fixed_modalities=fixed_modalities,
        known_bad=known_bad,
        order=list(modalities),
        extra={
            "manifest": str(manifest),
            "modalities": modalities,
            "text_model": text_model,
            "tokenizer": record,
            "split": "manifest" if has_split else f"seeded stratified (seed {job.seed})",
        },
    )
    return driver.run(job, plan, preparer=NAME, version=VERSION)
