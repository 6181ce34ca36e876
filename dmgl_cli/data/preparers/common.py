"""Helpers the raw-file preparers share: layout checks, split files, exact stratified splits, option checks."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dmgl_cli.data.media import AUDIO_STORES, clip_samples, seconds_for_frames, spectrogram_shape
from dmgl_cli.data.preparers.base import PrepareJob
from dmgl_cli.errors import DmglError

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def raw_folder(job: PrepareJob, dataset: str, layout: str) -> Path:
    if job.raw is None:
        raise DmglError(f"`dmgl prepare {dataset}` needs --raw PATH, the folder of the downloaded dataset:\n{layout}")
    return Path(job.raw)


def check_layout(raw: Path, required: Iterable[str], dataset: str, layout: str) -> None:
    """Every path in ``required`` (relative to ``raw``; a trailing '/' means a folder) must exist, else one error
    that lists everything missing and shows the expected layout."""
    missing = []
    for rel in required:
        path = raw / rel.rstrip("/")
        ok = path.is_dir() if rel.endswith("/") else path.is_file()
        if not ok:
            missing.append(rel)
    if missing:
        raise DmglError(
            f"{raw} does not look like the raw {dataset} download: missing {', '.join(missing)}.\n"
            f"Expected layout under --raw:\n{layout}"
        )


def visible_files(folder: Path, suffixes: set[str], recursive: bool = False) -> list[Path]:
    """Files in ``folder`` with one of ``suffixes`` (case-insensitive), skipping hidden files (``._x`` etc.)."""
    pattern = "**/*" if recursive else "*"
    return sorted(
        p
        for p in folder.glob(pattern)
        if p.is_file()
        and p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def normalise_split(value: str, where: str) -> str:
    split = SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise DmglError(f"{where}: unknown split {value!r}; use train, val (valid, validation, dev) or test")
    return split


def exact_stratified_split(labels: Sequence[int], held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held) with exactly ``held_out`` held out, spread over classes in proportion to their size
    (largest remainders), each class shuffled by a generator seeded with ``seed``. Both sorted."""
    label_array = np.asarray(labels)
    total = len(label_array)
    if not 0 < held_out < total:
        raise DmglError(f"cannot hold out {held_out} of {total} samples")
    classes, counts = np.unique(label_array, return_counts=True)
    quotas = counts * held_out / total
    take = np.floor(quotas).astype(int)
    remainder = held_out - take.sum()
    for position in np.argsort(-(quotas - take), kind="stable")[:remainder]:
        take[position] += 1
    rng = np.random.default_rng(seed)
    held = []
    for cls, count in zip(classes, take, strict=True):
        members = np.flatnonzero(label_array == cls)
        rng.shuffle(members)
        held.append(members[:count])
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    kept_idx = np.setdiff1d(np.arange(total), held_idx).astype(np.int64)
    return kept_idx, held_idx


def read_text_file(path: Path) -> str:
    """A UTF-8 text file (a BOM is dropped); anything else is a clear error."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DmglError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def read_id_label_csv(path: Path, what: str) -> list[tuple[str, str]]:
    """Rows ``id,label`` (an optional header row whose first cell is a known column name is skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DmglError(f"{what} {path} does not exist")
    rows: list[tuple[str, str]] = []
    for number, row in enumerate(csv.reader(io.StringIO(read_text_file(path), newline="")), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DmglError(f"{path}:{number}: expected `id,label`, got {','.join(row)!r}")
        ident, label = row[0].strip(), row[1].strip()
        if number == 1 and ident.lower() in ("clip_id", "id", "clip", "name", "youtube_id", "video_id"):
            continue
        rows.append((ident, label))
    if not rows:
        raise DmglError(f"{what} {path} lists no samples")
    return rows


def split_files_option(job: PrepareJob, key: str = "split_files") -> dict[str, Path] | None:
    """``--split-file SPLIT=PATH`` values (``{"train": path, ...}``), checked; None when not given."""
    value = job.options.get(key)
    if value in (None, "", {}):
        return None
    if not isinstance(value, dict):
        raise DmglError(f"option {key} must map split names to files, e.g. --split-file train=train.csv")
    files = {normalise_split(split, "--split-file"): Path(str(path)).expanduser() for split, path in value.items()}
    for split in ("train", "test"):
        if split not in files:
            raise DmglError(f"--split-file needs a file for the {split} split (e.g. --split-file {split}={split}.csv)")
    return files


def positive_int(job: PrepareJob, key: str, minimum: int = 1) -> int:
    value = job.option(key, int)
    if value < minimum:
        raise DmglError(f"option {key} must be >= {minimum}, got {value}")
    return value


def positive_float(job: PrepareJob, key: str) -> float:
    value = float(job.option(key, (int, float)))
    if value <= 0:
        raise DmglError(f"option {key} must be > 0, got {value}")
    return value


def audio_seconds(
    job: PrepareJob, declared: dict[str, Any], seconds_key: str = "seconds", frames_key: str = "spectrogram_frames"
) -> float:
    """The length audio clips are repeated or cut to: ``-o seconds=S``, or ``-o spectrogram_frames=N``, the length
    whose log-spectrogram has exactly N columns, so that a target shape needs no arithmetic (the authors' CREMA-D
    257 x 188 is ``spectrogram_frames=188``, 1.8903 s). ``declared`` is the preparer's OPTIONS: a seconds other
    than its default, given with spectrogram_frames, is refused (they would contradict each other)."""
    frames = job.options.get(frames_key)
    if frames is None:
        return positive_float(job, seconds_key)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise DmglError(
            f"option {frames_key} must be a whole number of spectrogram columns >= 1 (e.g. {frames_key}=188 for "
            f"257 x 188), got {frames!r}"
        )
    if job.options.get(seconds_key) != declared[seconds_key]:
        raise DmglError(
            f"give -o {seconds_key} or -o {frames_key}, not both ({frames_key}={frames} means "
            f"{seconds_for_frames(frames):.7g} s)"
        )
    return seconds_for_frames(frames)


def choice(job: PrepareJob, key: str, valid: Sequence[str]) -> str:
    value = job.option(key, str)
    if value not in valid:
        raise DmglError(f"option {key} must be one of {', '.join(valid)}, got {value!r}")
    return value


def float_dtype(job: PrepareJob, key: str = "audio_dtype") -> str:
    return choice(job, key, ("float16", "float32"))


def audio_store(job: PrepareJob, key: str = "audio_store") -> str:
    """``-o audio_store``: pcm16 (the samples, the spectrogram computed when read) or spectrogram."""
    return choice(job, key, AUDIO_STORES)


def audio_modality(seconds: float, dtype: str, store: str):
    """The :class:`~dmgl_cli.data.preparers.driver.Modality` of clips of ``seconds`` in ``store``: its shape and
    dtype are the spectrogram's either way (what a read gives and the model sees); pcm16 adds the sample count."""
    from dmgl_cli.data.preparers import driver

    if store == "pcm16":
        return driver.Modality(
            "audio", spectrogram_shape(seconds), dtype, storage="pcm16", samples=clip_samples(seconds)
        )
    return driver.Modality("audio", spectrogram_shape(seconds), dtype)


def few(items: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in list(items)[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def reject(
    job: PrepareJob, known_bad: list[dict[str, Any]], *, split: str, ident: str, path: str | Path, reason: str
) -> None:
    """A sample found bad before decoding (a malformed line, an unreadable text file): stop with its location, or
    under --skip-bad record it (it joins the manifest's bad_samples) and leave it out."""
    if not job.skip_bad:
        raise DmglError(f"{path}: {reason}. Fix it, or re-run with --skip-bad to record it and go on")
    known_bad.append({"split": split, "id": ident, "path": str(path), "reason": reason})


def class_order(labels: Iterable[str]) -> list[str]:
    """Distinct labels, numerically sorted when they are all integers, else alphabetically."""
    distinct = sorted(set(labels))
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return distinct


def tokenizer_record(tokenizer, text_model: str, max_tokens: int) -> dict[str, Any]:
    """What the manifest's ``extra.tokenizer`` records of the tokenizer that made a text modality:
    ``{name, class, vocab_size}``. Training checks it against the text encoder (CLIP's tokens feed only
    ``clip_text``, BERT's never: ``models.encoders.check_tokenisation``). Refuses ``max_tokens`` beyond the
    tokenizer's own limit (CLIP's 77)."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_tokens:
        raise DmglError(
            f"option max_tokens is {max_tokens}, but the tokenizer of {text_model!r} ({type(tokenizer).__name__}) "
            f"takes at most {limit} tokens; pass -o max_tokens={limit}"
        )
    return {"name": text_model, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer)}


def text_image_plan(
    job: PrepareJob,
    entries: dict[str, list[dict[str, Any]]],
    classes: list[str],
    known_bad: list[dict[str, Any]],
    extra: dict[str, Any],
):
    """The plan of a text-image dataset (Sarcasm, Twitter2015). ``entries[split]`` rows carry ``id``, ``label``,
    ``image`` (path), ``text`` and optionally ``pair`` (a second text segment). Text is tokenised up front (one
    fixed [n, 2, max_tokens] array per split, with ``--text-model``'s tokenizer: BERT's by default, CLIP's for the
    CLIP recipes; recorded by :func:`tokenizer_record`); images are decoded per sample by the driver."""
    import functools

    from dmgl_cli.data.media import load_tokenizer, tokenize
    from dmgl_cli.data.preparers import driver

    size = positive_int(job, "image_size", 8)
    length = positive_int(job, "max_tokens", 2)
    text_model = job.option("text_model", str)
    tokenizer = load_tokenizer(text_model)
    record = tokenizer_record(tokenizer, text_model, length)
    samples, fixed = [], {}
    for split, rows in entries.items():
        if not rows:
            continue
        for index, row in enumerate(rows):
            samples.append(driver.Sample(split, index, row["label"], row["id"], row["image"]))
        pairs = [row["pair"] for row in rows] if "pair" in rows[0] else None
        fixed[split] = {"text": tokenize(tokenizer, [row["text"] for row in rows], length, pairs)}
    return driver.Plan(
        samples=samples,
        classes=classes,
        decoded={"image": driver.Modality("image", (size, size, 3), "uint8")},
        decode=functools.partial(decode_image, size=size),
        fixed=fixed,
        fixed_modalities={"text": driver.Modality("text", (2, length), "int64")},
        known_bad=known_bad,
        extra={"text_model": text_model, "tokenizer": record, **extra},
        order=["text", "image"],
    )


def decode_image(path: str, *, size: int) -> dict[str, Any]:
    from dmgl_cli.data.media import BadSample, load_image

    if not Path(path).is_file():
        raise BadSample(path, "does not exist (every sample needs its image)")
    return {"image": load_image(path, size)}
