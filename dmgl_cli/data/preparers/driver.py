"""The per-sample driver every raw-file preparer uses: parallel, resumable, atomic.

A preparer lists its samples (split, position in the split, label, what to decode) and hands over a picklable
``decode(source) -> {key: array}``; the driver does the rest:

* **Parallel**: ``--workers N`` decodes in a ``ProcessPoolExecutor`` (forkserver processes, a bounded number of
  samples in flight); ``--workers 1`` decodes in-process. Forkserver rather than fork: the CLI process may hold
  threads (torch, tqdm) that a fork would copy mid-lock. As with any multiprocessing, a script calling
  :func:`dmgl_cli.prepare.prepare_dataset` with workers > 1 needs an ``if __name__ == "__main__":`` guard.
* **Resumable**: decoded samples go straight into memory-mapped staging arrays in a stable work folder
  ``<datasets>/.work-<name>/``; every couple of seconds the arrays are flushed and then the finished positions
  appended to ``done.log``. A re-run with the same plan (samples, options, preparer version — fingerprinted in
  ``plan.json``) skips what the log lists; a different plan starts over.
* **Atomic**: only when every sample is done are the final arrays written (compacted past samples skipped as bad)
  and the folder renamed into place by :class:`PreparedWriter`; until then no dataset appears.
* **Bad files**: a :class:`~dmgl_cli.data.media.BadSample` stops the run with the file's path (finished samples
  stay done for the next run), or with ``--skip-bad`` is recorded (split, id, path, reason) in the manifest and
  the registry. A sample recorded as bad is tried again by a run without ``--skip-bad``.
"""

from __future__ import annotations

import concurrent.futures as futures
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmgl_cli.data.frames import FRAME_STORES, JPEG_CHANNELS, JpegEncodingDecode, write_store
from dmgl_cli.data.media import BadSample
from dmgl_cli.data.pcm_audio import pcm_path
from dmgl_cli.data.prepared import SPLITS, PreparedWriter
from dmgl_cli.data.preparers.base import PrepareJob
from dmgl_cli.errors import DmglError

FLUSH_SECONDS = 2.0
# The forkserver imports these once and workers fork from it; decoder_warmup also runs each decoder once, because
# librosa loads its submodules lazily on the first decode (~1.2 s a worker otherwise).
FORKSERVER_PRELOAD = ["__main__", "dmgl_cli.data.preparers", "dmgl_cli.data.media", "dmgl_cli.data.decoder_warmup"]
IN_FLIGHT_PER_WORKER = 4
_FINALISED = "finalised"


@dataclass(frozen=True)
class Sample:
    split: str  # train | val | test
    index: int  # position in its split, 0..n-1
    label: int
    ident: str  # the id shown in messages and recorded for bad samples
    source: Any  # picklable: what ``decode`` needs (paths, frame ranges, ...)


@dataclass(frozen=True)
class Modality:
    kind: str  # audio | video | image | text | vector
    shape: tuple[int, ...]  # per sample
    dtype: str
    # "raw" (a memory-mapped .npy array), "jpeg" (video frames as JPEG at jpeg_quality; data/frames.py) or "pcm16"
    # (audio as int16 samples, `samples` a clip, read as spectrograms of `shape` and `dtype`; data/pcm_audio.py)
    storage: str = "raw"
    jpeg_quality: int = 90
    samples: int = 0

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}
        if self.storage != "raw":
            spec["storage"] = self.storage
        if self.storage == "pcm16":
            spec["samples"] = self.samples
        return spec

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of one sample as ``decode`` returns it and the array file holds it (not for jpeg)."""
        return (self.samples,) if self.storage == "pcm16" else self.shape

    @property
    def stored_dtype(self) -> str:
        return "int16" if self.storage == "pcm16" else self.dtype

    def file_name(self, key: str) -> str:
        """The array file of modality ``key`` in a split's folder (not for jpeg)."""
        return pcm_path(Path(), key).name if self.storage == "pcm16" else f"{key}.npy"


def frame_store(job: PrepareJob, kind: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """A preparer's ``frame_store`` (raw | jpeg) and ``frame_quality`` options as :class:`Modality` arguments for
    frames of ``shape`` [T, H, W, C]; a JPEG store needs 1 or 3 channels (other frames stay raw, as NVGesture's
    2-channel optical flow)."""
    store = job.option("frame_store", str)
    if store not in FRAME_STORES:
        raise DmglError(f"option frame_store={store!r} must be one of {', '.join(FRAME_STORES)}")
    quality = job.option("frame_quality", int)
    if not 1 <= quality <= 100:
        raise DmglError(f"option frame_quality={quality} must be from 1 to 100 (JPEG quality)")
    if store == "raw" or kind != "video" or shape[-1] not in JPEG_CHANNELS:
        return {}
    return {"storage": "jpeg", "jpeg_quality": quality}


@dataclass
class Plan:
    """Everything one prepared dataset is made of."""

    samples: list[Sample]
    classes: list[str]
    decoded: dict[str, Modality]  # modalities decode() returns, per sample
    decode: Callable[[Any], dict[str, np.ndarray]]
    # Modalities computed up front for a whole split (e.g. tokenised text): {split: {key: array [n, ...]}}.
    fixed: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    fixed_modalities: dict[str, Modality] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # Samples dropped before decoding under --skip-bad (a malformed list line, an unreadable text file):
    # {"split", "id", "path", "reason"} records that join the manifest's bad_samples.
    known_bad: list[dict[str, Any]] = field(default_factory=list)
    order: list[str] | None = None  # modality order in the manifest (default: decoded, then fixed)


def split_sizes(samples: Sequence[Sample]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for sample in samples:
        sizes[sample.split] = sizes.get(sample.split, 0) + 1
    return sizes


def _check_plan(plan: Plan) -> dict[str, int]:
    sizes = split_sizes(plan.samples)
    for split, size in sizes.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        positions = sorted(s.index for s in plan.samples if s.split == split)
        if positions != list(range(size)):
            raise ValueError(f"split {split}: sample positions are not 0..{size - 1}")
    for split, arrays in plan.fixed.items():
        for key, values in arrays.items():
            if values.shape[0] != sizes.get(split, 0) or tuple(values.shape[1:]) != plan.fixed_modalities[key].shape:
                raise ValueError(f"fixed array {split}/{key} has shape {values.shape}")
    return sizes


def _fingerprint(job: PrepareJob, plan: Plan, preparer: str, version: str) -> str:
    digest = hashlib.sha256()
    header = {
        "preparer": preparer,
        "version": version,
        "options": {k: str(v) for k, v in sorted(job.options.items())},
        "seed": job.seed,
        "raw": str(job.raw),
        "classes": plan.classes,
        "decoded": {k: m.spec() for k, m in sorted(plan.decoded.items())},
        "known_bad": plan.known_bad,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for s in plan.samples:
        digest.update(f"\n{s.split}\t{s.index}\t{s.label}\t{s.ident}\t{s.source!r}".encode())
    return digest.hexdigest()


class _WorkFolder:
    """The stable, locked work folder of one dataset name: plan fingerprint, done log, staging arrays."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        self._lock_handle = None

    def open(self) -> bool:
        """Lock the folder; return True when it holds a compatible earlier run to resume."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_handle = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_handle.close()
            raise DmglError(f"another `dmgl prepare` is writing {self.path}; wait for it to finish") from None
        plan_file = self.path / "plan.json"
        if plan_file.is_file():
            try:
                recorded = json.loads(plan_file.read_text()).get("fingerprint")
            except json.JSONDecodeError:
                recorded = None
            if recorded == self.fingerprint:
                return True
        self.reset()  # a different plan (or none): start over
        return False

    def reset(self) -> None:
        for child in self.path.iterdir():
            if child.name == ".lock":
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        (self.path / "plan.json").write_text(json.dumps({"fingerprint": self.fingerprint}))

    def release(self) -> None:
        (self.path / ".lock").unlink(missing_ok=True)
        for name in ("plan.json", "done.log", _FINALISED):
            (self.path / name).unlink(missing_ok=True)
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def close(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    # The done log: one JSON object per line, {"s": split, "i": index} or with "bad": {...} for skipped samples.
    def read_done(self) -> tuple[set[tuple[str, int]], dict[tuple[str, int], dict[str, Any]]]:
        done: set[tuple[str, int]] = set()
        bad: dict[tuple[str, int], dict[str, Any]] = {}
        log = self.path / "done.log"
        if not log.is_file():
            return done, bad
        for line in log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash: everything after it is redone
            key = (entry["s"], int(entry["i"]))
            if "bad" in entry:
                bad[key] = entry["bad"]
            else:
                done.add(key)
                bad.pop(key, None)
        return done, bad

    def append_done(self, entries: list[dict[str, Any]]) -> None:
        if not entries:
            return
        with open(self.path / "done.log", "a") as handle:
            handle.write("".join(json.dumps(e) + "\n" for e in entries))
            handle.flush()
            os.fsync(handle.fileno())

    def staging(self, split: str, key: str, shape: tuple[int, ...], dtype: str, *, create: bool) -> np.memmap:
        path = self.path / "staging" / split / f"{key}.npy"
        if path.exists():
            try:
                existing = np.load(path, mmap_mode="r+")
            except ValueError:
                existing = None
            if existing is not None and existing.shape == shape and existing.dtype == np.dtype(dtype):
                return existing
        if not create:
            raise RuntimeError(f"staging array {path} is missing")
        path.parent.mkdir(parents=True, exist_ok=True)
        return _allocated_memmap(path, dtype, shape)

    def packed_path(self, split: str, key: str, index: int) -> Path:
        return self.path / "staging" / split / f"{key}.jpeg" / f"{index}.bin"

    def write_packed(self, split: str, key: str, index: int, packed: np.ndarray) -> None:
        path = self.packed_path(split, key, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        with open(partial, "wb") as handle:
            handle.write(np.ascontiguousarray(packed, dtype=np.uint8).tobytes())
        os.replace(partial, path)


def _allocated_memmap(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new ``.npy`` memmap whose disk blocks are reserved up front. ``open_memmap`` makes a sparse file, and
    writing through the map into a sparse file on a full disk kills the process with SIGBUS and no message;
    reserving fails here instead with an OSError naming the file (ENOSPC), which ``dmgl prepare`` reports."""
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    except OSError as exc:
        path.unlink(missing_ok=True)  # so that a re-run makes it again rather than reusing a sparse file
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    return array


def _save_npy(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with open(partial, "wb") as handle:
        np.save(handle, values)
    os.replace(partial, path)


def _compact(source: np.ndarray, kept: np.ndarray, target: Path, chunk_bytes: int = 1 << 28) -> None:
    """Write ``source[kept]`` to ``target`` in chunks (the staging arrays can be far larger than memory)."""
    partial = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    out = _allocated_memmap(partial, source.dtype, (len(kept), *source.shape[1:]))
    row_bytes = max(1, int(np.prod(source.shape[1:], dtype=np.int64)) * source.dtype.itemsize)
    step = max(1, chunk_bytes // row_bytes)
    for begin in range(0, len(kept), step):
        out[begin : begin + step] = source[kept[begin : begin + step]]
    out.flush()
    del out
    os.replace(partial, target)


def _decode_all(
    job: PrepareJob,
    plan: Plan,
    work: _WorkFolder,
    sizes: dict[str, int],
    resumed: bool,
    bad: dict[tuple[str, int], dict[str, Any]],
) -> None:
    done, recorded_bad = work.read_done() if resumed else (set(), {})
    if job.skip_bad:
        bad.update(recorded_bad)
        finished = done | set(recorded_bad)
    else:
        finished = done  # samples skipped earlier are tried again
    arrays = {
        (split, key): work.staging(split, key, (size, *mod.stored_shape), mod.stored_dtype, create=True)
        for split, size in sizes.items()
        for key, mod in plan.decoded.items()
        if mod.storage != "jpeg"
    }
    jpeg = {key: mod.jpeg_quality for key, mod in plan.decoded.items() if mod.storage == "jpeg"}
    decode = JpegEncodingDecode(plan.decode, jpeg) if jpeg else plan.decode
    todo = [s for s in plan.samples if (s.split, s.index) not in finished]
    total = len(plan.samples)
    completed = total - len(todo)
    job.progress(completed, total, "decoding")
    pending_log: list[dict[str, Any]] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        for arr in arrays.values():
            arr.flush()
        work.append_done(pending_log)
        pending_log.clear()
        last_flush = time.monotonic()

    def store(sample: Sample, result: dict[str, np.ndarray]) -> None:
        for key, mod in plan.decoded.items():
            if mod.storage == "jpeg":
                # one packed file per sample (variable size), complete before the sample is logged as done
                work.write_packed(sample.split, key, sample.index, np.asarray(result[key]))
                continue
            value = np.asarray(result[key])
            if value.shape != mod.stored_shape:
                raise ValueError(
                    f"decode returned {key} of shape {value.shape} for {sample.ident}, expected {mod.stored_shape}"
                )
            arrays[(sample.split, key)][sample.index] = value
        pending_log.append({"s": sample.split, "i": sample.index})

    def failed(sample: Sample, error: BadSample) -> None:
        if not job.skip_bad:
            flush()
            raise DmglError(
                f"{error.path}: {error.reason} (sample {sample.ident} of the {sample.split} split). Replace or remove "
                "the file, or re-run with --skip-bad to record it and go on; the samples already prepared are kept "
                "and a re-run resumes after them"
            )
        record = {"split": sample.split, "id": sample.ident, "path": error.path, "reason": error.reason}
        bad[(sample.split, sample.index)] = record
        pending_log.append({"s": sample.split, "i": sample.index, "bad": record})

    try:
        if job.workers <= 1 or len(todo) <= 1:
            for sample in todo:
                try:
                    store(sample, decode(sample.source))
                except BadSample as error:
                    failed(sample, error)
                completed += 1
                job.progress(completed, total, "decoding")
                if time.monotonic() - last_flush > FLUSH_SECONDS:
                    flush()
        else:
            context = multiprocessing.get_context("forkserver")
            # Workers fork from one server that has the decoders imported already: starting one costs
            # milliseconds, not an import of librosa and PyAV each.
            context.set_forkserver_preload(FORKSERVER_PRELOAD)
            pool = futures.ProcessPoolExecutor(max_workers=job.workers, mp_context=context)
            queue = iter(todo)
            in_flight: dict[futures.Future, Sample] = {}

            def submit_next() -> None:
                sample = next(queue, None)
                if sample is not None:
                    in_flight[pool.submit(decode, sample.source)] = sample

            try:
                for _ in range(job.workers * IN_FLIGHT_PER_WORKER):
                    submit_next()
                while in_flight:
                    finished_now, _ = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
                    for future in finished_now:
                        sample = in_flight.pop(future)
                        try:
                            store(sample, future.result())
                        except BadSample as error:
                            failed(sample, error)
                        except futures.process.BrokenProcessPool:
                            names = ", ".join(s.ident for s in [sample, *in_flight.values()][:8])
                            raise DmglError(
                                f"a worker process died while decoding one of: {names}; re-run with --workers 1 "
                                "to find the file (the samples already prepared are kept)"
                            ) from None
                        completed += 1
                        job.progress(completed, total, "decoding")
                        submit_next()
                    if time.monotonic() - last_flush > FLUSH_SECONDS:
                        flush()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        flush()


def run(job: PrepareJob, plan: Plan, *, preparer: str, version: str) -> dict[str, Any]:
    """Decode every sample of ``plan`` (resuming an interrupted run), then write and register-ready finish."""
    sizes = _check_plan(plan)
    for split in ("train", "test"):
        if not sizes.get(split):
            raise DmglError(f"{job.name}: the raw data gives no {split} samples; check the split files or options")
    work = _WorkFolder(job.destination.parent / f".work-{job.name}", _fingerprint(job, plan, preparer, version))
    resumed = work.open()
    bad: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        with PreparedWriter(job.destination, work_dir=work.path, keep_on_error=True) as writer:
            finalised = resumed and (work.path / _FINALISED).exists()
            if finalised:
                _, bad = work.read_done()
                if bad and not job.skip_bad:  # finished with samples skipped, now asked not to skip: redo
                    work.reset()
                    bad, finalised, resumed = {}, False, False
            if not finalised:
                _decode_all(job, plan, work, sizes, resumed, bad)
                _finalise(plan, work, sizes, bad)
            shutil.rmtree(work.path / "staging", ignore_errors=True)
            records = list(plan.known_bad) + [bad[key] for key in sorted(bad)]
            work.release()
            every = {**plan.decoded, **plan.fixed_modalities}
            modalities = {k: every[k].spec() for k in (plan.order or every)}
            return writer.finish(
                name=job.name,
                classes=plan.classes,
                modalities=modalities,
                preparer=preparer,
                preparer_version=version,
                extra={
                    "seed": job.seed,
                    "raw": str(job.raw) if job.raw else None,
                    "options": {k: v for k, v in job.options.items()},
                    **plan.extra,
                },
                bad_samples=records,
            )
    finally:
        work.close()


def _finalise(plan: Plan, work: _WorkFolder, sizes: dict[str, int], bad: dict[tuple[str, int], dict[str, Any]]) -> None:
    """Final arrays (labels, decoded, fixed) with bad samples dropped; idempotent until the marker is written."""
    labels: dict[str, np.ndarray] = {split: np.zeros(size, dtype=np.int64) for split, size in sizes.items()}
    idents: dict[str, list[str]] = {split: [""] * size for split, size in sizes.items()}
    for sample in plan.samples:
        labels[sample.split][sample.index] = sample.label
        idents[sample.split][sample.index] = sample.ident
    for split, size in sizes.items():
        kept = np.array([i for i in range(size) if (split, i) not in bad], dtype=np.int64)
        _save_npy(work.path / split / "labels.npy", labels[split][kept])
        # Which raw sample each row came from (not a modality; for tracing results back to files).
        _save_npy(work.path / split / "ids.npy", np.array([idents[split][i] for i in kept], dtype=str))
        for key, mod in plan.decoded.items():
            if mod.storage == "jpeg":
                packed = (np.fromfile(work.packed_path(split, key, int(i)), dtype=np.uint8) for i in kept)
                write_store(work.path / split, key, packed, mod.shape[0])
                continue
            staging = work.staging(split, key, (size, *mod.stored_shape), mod.stored_dtype, create=False)
            target = work.path / split / mod.file_name(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            if len(kept) == size:
                # A hard link, not a move: the staging array stays whole until the marker below is written, so a
                # crash in here is finished by the next run.
                staging.flush()
                del staging
                partial = target.with_name(target.name + ".part")
                partial.unlink(missing_ok=True)
                os.link(work.path / "staging" / split / f"{key}.npy", partial)
                os.replace(partial, target)
            else:
                _compact(staging, kept, target)
        for key, values in plan.fixed.get(split, {}).items():
            _save_npy(work.path / split / f"{key}.npy", np.ascontiguousarray(values[kept]))
    (work.path / _FINALISED).write_text("1")
