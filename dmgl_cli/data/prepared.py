"""The prepared-dataset format every preparer writes and the trainer reads.

    <registry>/datasets/<name>/
      manifest.json              name, classes, modalities (kind, dtype, per-sample shape), split sizes,
                                 sha256 of every array file, preparer and its version, bad samples skipped
      <split>/labels.npy         int64 [n]
      <split>/<modality>.npy     one array per modality, [n, *shape] (uint8 frames/images, float16/32
                                 spectrograms and vectors, int64 [n, 2, L] text = token ids and attention mask)
      <split>/<modality>.jpeg    instead, for video frames prepared with frame_store=jpeg (manifest: "storage":
      <split>/<modality>.offsets.npy   "jpeg"): the frames as JPEG and where each starts (data/frames.py)
      <split>/<modality>.pcm16.npy     instead, for audio prepared with audio_store=pcm16 (manifest: "storage":
                                 "pcm16", "samples": per clip): int16 [n, samples], the waveform the
                                 spectrogram of the manifest's shape is computed from when read (data/pcm_audio.py)

Arrays are plain ``.npy`` files opened with ``mmap_mode='r'``; the two compact stores are read through classes that
look like those arrays and decode (JPEG frames) or compute (spectrograms from PCM) just the rows of a batch, in the
loader's workers. Every stored file is checksummed in the manifest (``dmgl datasets verify``). A
dataset is written into a hidden temporary folder beside its destination and renamed into place only when
complete, so a crash never leaves a half-written dataset behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmgl_cli.data.frames import JpegFrames
from dmgl_cli.data.pcm_audio import PcmSpectrograms, check_pcm_store, pcm_path
from dmgl_cli.errors import DmglError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MODALITY_KINDS = ("vector", "audio", "video", "image", "text")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class PreparedWriter:
    """Write a prepared dataset atomically.

    Use as a context manager; allocate arrays with :meth:`array` (a writable memmap, so preparers can fill
    large datasets sample by sample) or store whole ones with :meth:`put`, then call :meth:`finish`. If the block
    raises, the temporary folder is removed and nothing appears at ``destination``.
    """

    def __init__(self, destination: Path, *, work_dir: Path | None = None, keep_on_error: bool = False):
        self.destination = Path(destination)
        # A resumable preparer passes a stable work_dir (and keep_on_error) so that a re-run finds the samples
        # it already wrote; everyone else gets a private folder that is removed on failure.
        self.work_dir = (
            Path(work_dir) if work_dir else self.destination.parent / f".tmp-{self.destination.name}-{os.getpid()}"
        )
        self.keep_on_error = keep_on_error
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def __enter__(self) -> PreparedWriter:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._arrays.clear()
        if exc_type is not None and not self.keep_on_error:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def array(self, split: str, key: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A writable memory-mapped array for ``<split>/<key>.npy``; reopened (not cleared) if it already exists."""
        path = self.work_dir / split / f"{key}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            existing = np.load(path, mmap_mode="r+")
            if existing.shape == tuple(shape) and existing.dtype == np.dtype(dtype):
                self._arrays[(split, key)] = existing
                return existing
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        self._arrays[(split, key)] = arr
        return arr

    def put(self, split: str, key: str, values: np.ndarray) -> None:
        target = self.array(split, key, values.shape, values.dtype)
        target[...] = values

    def finish(
        self,
        *,
        name: str,
        classes: list[str],
        modalities: dict[str, dict[str, Any]],
        preparer: str,
        preparer_version: str,
        extra: dict[str, Any] | None = None,
        bad_samples: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Check the arrays, checksum them, write manifest.json and rename the dataset into place."""
        for arr in self._arrays.values():
            if isinstance(arr, np.memmap):
                arr.flush()
        self._arrays.clear()
        splits: dict[str, int] = {}
        for split in SPLITS:
            labels_path = self.work_dir / split / "labels.npy"
            if not labels_path.exists():
                continue
            labels = np.load(labels_path, mmap_mode="r")
            splits[split] = int(labels.shape[0])
            if splits[split] and (labels.min() < 0 or labels.max() >= len(classes)):
                raise DmglError(f"{name}: {split} labels fall outside the {len(classes)} classes")
            for modality, spec in modalities.items():
                if spec.get("storage") == "jpeg":
                    _check_jpeg_store(self.work_dir / split, modality, splits[split], spec, name, split)
                    continue
                if spec.get("storage") == "pcm16":
                    path = pcm_path(self.work_dir / split, modality)
                    if not path.exists():
                        raise DmglError(f"{name}: split {split} has no samples for modality {modality!r}")
                    problem = check_pcm_store(path, splits[split], spec)
                    if problem:
                        raise ValueError(f"{name}/{split}/{modality}: {path.name} {problem}")
                    continue
                path = self.work_dir / split / f"{modality}.npy"
                if not path.exists():
                    raise DmglError(f"{name}: split {split} has no array for modality {modality!r}")
                arr = np.load(path, mmap_mode="r")
                if arr.shape[0] != splits[split] or list(arr.shape[1:]) != list(spec["shape"]):
                    raise ValueError(
                        f"{name}/{split}/{modality}: array shape {arr.shape} does not match "
                        f"{splits[split]} samples of shape {spec['shape']}"
                    )
        if "train" not in splits or "test" not in splits:
            raise ValueError(f"{name}: a prepared dataset needs train and test splits, got {sorted(splits)}")
        for modality, spec in modalities.items():
            if spec.get("kind") not in MODALITY_KINDS:
                raise ValueError(f"modality {modality}: kind must be one of {MODALITY_KINDS}")
        stored = [*self.work_dir.rglob("*.npy"), *self.work_dir.rglob("*.jpeg")]
        files = {str(p.relative_to(self.work_dir)): sha256_file(p) for p in sorted(stored)}
        manifest = {
            "name": name,
            "format_version": FORMAT_VERSION,
            "preparer": preparer,
            "preparer_version": preparer_version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "classes": list(classes),
            "modalities": {
                m: {
                    "kind": s["kind"],
                    "dtype": str(s["dtype"]),
                    "shape": list(s["shape"]),
                    **({"storage": s["storage"]} if s.get("storage", "raw") != "raw" else {}),
                    **({"samples": int(s["samples"])} if s.get("storage") == "pcm16" else {}),
                }
                for m, s in modalities.items()
            },
            "splits": splits,
            "files": files,
            "checksum": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
            "bad_samples": list(bad_samples or []),
            "extra": dict(extra or {}),
        }
        (self.work_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        # Swap in the finished dataset; an older one with the same name is moved aside first and removed after.
        old = None
        if self.destination.exists():
            old = self.destination.parent / f".old-{self.destination.name}-{os.getpid()}"
            os.replace(self.destination, old)
        os.replace(self.work_dir, self.destination)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest


def _check_jpeg_store(folder: Path, modality: str, samples: int, spec: dict[str, Any], name: str, split: str) -> None:
    offsets_path, data_path = folder / f"{modality}.offsets.npy", folder / f"{modality}.jpeg"
    if not offsets_path.exists() or not data_path.exists():
        raise DmglError(f"{name}: split {split} has no JPEG frames for modality {modality!r}")
    offsets = np.load(offsets_path, mmap_mode="r")
    if offsets.shape != (samples, spec["shape"][0] + 1):
        raise ValueError(
            f"{name}/{split}/{modality}: frame offsets of shape {offsets.shape} do not match {samples} samples of "
            f"{spec['shape'][0]} frames"
        )
    if samples and int(offsets[-1, -1]) != data_path.stat().st_size:
        raise ValueError(f"{name}/{split}/{modality}: the JPEG file does not end where its offsets say")


# A modality's samples as stored: a memory-mapped array, or JPEG frames or PCM audio that read like one.
StoredArray = np.ndarray | JpegFrames | PcmSpectrograms


@dataclass
class SplitArrays:
    labels: np.ndarray
    inputs: dict[str, StoredArray]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _open_stored(folder: Path, modality: str, spec: dict[str, Any]) -> StoredArray:
    """One modality of a split as its manifest entry's ``storage`` says (none: a plain array)."""
    storage = spec.get("storage")
    if storage == "jpeg":
        return JpegFrames(folder, modality, tuple(spec["shape"]))
    if storage == "pcm16":
        return PcmSpectrograms(folder, modality, tuple(spec["shape"]), spec["dtype"], int(spec["samples"]))
    if storage not in (None, "raw"):
        raise ValueError(f"modality {modality} has storage {storage!r}, which this dmgl does not read")
    return np.load(folder / f"{modality}.npy", mmap_mode="r")


class PreparedDataset:
    """Read side: the manifest plus memory-mapped arrays per split."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise DmglError(f"{self.path} is not a prepared dataset (no manifest.json); run `dmgl prepare` again")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise DmglError(f"{manifest_path} is corrupt ({exc}); run `dmgl prepare` again") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DmglError(
                f"{self.path} was prepared in format {self.manifest.get('format_version')}, this dmgl reads "
                f"{FORMAT_VERSION}; run `dmgl prepare {self.manifest.get('preparer', '')}` again"
            )

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def modalities(self) -> dict[str, dict[str, Any]]:
        return self.manifest["modalities"]

    @property
    def checksum(self) -> str:
        return self.manifest["checksum"]

    def has_split(self, split: str) -> bool:
        return split in self.manifest["splits"]

    def split(self, split: str) -> SplitArrays:
        if not self.has_split(split):
            raise DmglError(f"dataset {self.name} has no {split!r} split (it has {', '.join(self.manifest['splits'])})")
        folder = self.path / split
        try:
            labels = np.load(folder / "labels.npy", mmap_mode="r")
            inputs: dict[str, StoredArray] = {m: _open_stored(folder, m, spec) for m, spec in self.modalities.items()}
        except (OSError, ValueError) as exc:
            raise DmglError(
                f"prepared dataset {self.path} is damaged ({exc}); run `dmgl datasets verify {self.name}` "
                f"or `dmgl prepare` again"
            ) from None
        return SplitArrays(labels=labels, inputs=inputs)

    def verify(self) -> list[str]:
        """Files whose checksum no longer matches the manifest (missing files included)."""
        bad = []
        for rel, expected in self.manifest["files"].items():
            path = self.path / rel
            if not path.is_file() or sha256_file(path) != expected:
                bad.append(rel)
        return bad
