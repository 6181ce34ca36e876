"""Checkpoints: atomic writes, safe loads, RNG state capture.

A checkpoint is a dict of tensors and plain containers (no pickled objects), so it loads with
``torch.load(weights_only=True)``. It is written to a temporary file in the target folder, fsynced and renamed
over the old one: a crash leaves either the previous checkpoint or the new one, never a torn file. Leftover
temporary files from a crash are removed at the next save into the folder.

Training hands its checkpoints to a :class:`CheckpointWriter`: the state is copied to the CPU at once (what resume
needs is fixed at that moment), and written by a background thread while training goes on.
"""

from __future__ import annotations

import copy
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmgl_cli.errors import DmglError
from dmgl_cli.paths import atomic_write

FORMAT = "dmgl-checkpoint"
VERSION = 1
# What atomic_write_bytes leaves behind when a writer dies between writing and renaming.
_LEFTOVERS = ".*.pt.*.tmp"


def clean_leftovers(folder: Path) -> None:
    for leftover in Path(folder).glob(_LEFTOVERS):
        leftover.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path.parent)
    atomic_write(path, lambda handle: torch.save({"format": FORMAT, "version": VERSION, **state}, handle))


def cpu_snapshot(state: Any, spare: dict[tuple[Any, ...], list[torch.Tensor]] | None = None) -> Any:
    """A copy of ``state`` that training can no longer change: every tensor copied to the CPU, every dict, list and
    tuple rebuilt. Tensors that shared memory (tied weights) share their copy, as they would in the file. ``spare``
    holds CPU tensors free to be overwritten, by (dtype, shape, stride); a copy goes into one of them when it fits
    (taken out of ``spare``), else into new memory."""
    copies: dict[tuple[Any, ...], torch.Tensor] = {}

    def snapshot(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = (
                value.device,
                value.dtype,
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
            )
            if key not in copies:
                free = spare.get(_buffer_key(value)) if spare is not None else None
                if free:
                    copies[key] = free.pop().copy_(value.detach())
                else:
                    copies[key] = value.detach().to("cpu", copy=True)
            return copies[key]
        if isinstance(value, dict):
            copied = type(value)((k, snapshot(v)) for k, v in value.items())
            if hasattr(value, "__dict__"):  # an OrderedDict state_dict's _metadata (load_state_dict reads it)
                copied.__dict__.update(copy.deepcopy(value.__dict__))
            return copied
        if isinstance(value, list):
            return [snapshot(v) for v in value]
        if type(value) is tuple:
            return tuple(snapshot(v) for v in value)
        return copy.deepcopy(value)  # numbers, strings, None as they are; anything mutable (an array) copied

    return snapshot(state)


def _buffer_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.dtype, tuple(tensor.shape), tensor.stride())


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


class CheckpointWriter:
    """Writes checkpoints from a background thread, so that an epoch does not wait for the disk.

    :meth:`submit` takes a :func:`cpu_snapshot` of the state before it returns (later training steps cannot change
    what is written) and starts one thread that writes it. One write is in flight at most: a submit first waits for
    the previous write, so checkpoints land in the order they were made and at most one snapshot is held. A write's
    failure is raised, as a DmglError, by the next :meth:`submit` or :meth:`wait`. Whoever relies on a checkpoint
    being on disk (a run that ends, a resume point, a reader) calls :meth:`wait` first. The thread is not a daemon:
    an interpreter that exits still completes the write it started (it is atomic either way).

    A written snapshot's tensors are kept and overwritten by the next snapshot: copying into fresh memory costs as
    much as the write itself on a CPU (the page faults of ~190 MB for ResNet18 x 2 and its momentum, measured in
    bench/checkpoints.py), a copy into memory already mapped a fraction of it. :meth:`release` frees them (the end
    of a run). ``write`` must not keep the snapshot past its return."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failure: Exception | None = None
        self._what = ""
        self._written: dict[str, Any] | None = None  # the last snapshot written, whose tensors become spare
        self._spare: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    def submit(self, write: Callable[[dict[str, Any]], None], state: dict[str, Any], what: str) -> None:
        """Write ``state`` with ``write(snapshot)`` in the background; ``what`` names it in an error message."""
        self.wait()
        snapshot = cpu_snapshot(state, self._spare)
        self._what = what
        self._thread = threading.Thread(target=self._write, args=(write, snapshot), name="dmgl-checkpoint-writer")
        self._thread.start()

    def _write(self, write: Callable[[dict[str, Any]], None], snapshot: dict[str, Any]) -> None:
        try:
            write(snapshot)
            self._written = snapshot
        except Exception as exc:  # kept for the main thread, which raises it at its next submit or wait
            self._failure = exc

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its failure."""
        if self._thread is not None:
            self._thread.join()  # cleared after, so that a wait interrupted here (Ctrl-C) is waited for again
            self._thread = None
        written, self._written = self._written, None
        for tensor in {id(t): t for t in _tensors(written)}.values():  # a tied tensor is one buffer
            self._spare.setdefault(_buffer_key(tensor), []).append(tensor)
        failure, self._failure = self._failure, None
        if failure is not None:
            raise DmglError(f"cannot write {self._what} ({type(failure).__name__}: {failure})") from None

    def release(self) -> None:
        """:meth:`wait`, then free the tensors kept for the next snapshot."""
        try:
            self.wait()
        finally:
            self._spare = {}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a dmgl checkpoint with ``weights_only=True``; anything else is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise DmglError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/foreign files; all mean "not loadable"
        raise DmglError(
            f"checkpoint {path} is corrupt or not a dmgl checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DmglError(f"checkpoint {path} is not a dmgl checkpoint")
    if state.get("version") != VERSION:
        raise DmglError(f"checkpoint {path} has version {state.get('version')}, this dmgl reads {VERSION}")
    return state


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, refusing a checkpoint made for another model with a message instead of a traceback."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            details.append(f"unexpected {', '.join(unexpected[:3])}")
        if mismatched:
            details.append(f"shape differs for {', '.join(mismatched[:3])}")
        raise DmglError(f"checkpoint {source} was made for another model ({'; '.join(details)})")
    model.load_state_dict(state_dict)


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG the training loop may draw from, as tensors and plain values."""
    # legacy=True is numpy's default; spelled out because numpy's stubs type the bare call as the dict form.
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global RandomState is an MT19937, whose legacy state is a tuple
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if device is not None and device.type == "cuda":
        # The training device's generator only: get_rng_state_all() would create a CUDA context on every visible
        # GPU (a few hundred MB each), in every one of `dmgl sweep --devices`'s workers.
        state["cuda_device"] = torch.cuda.get_rng_state(_index(device))
    return state


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`capture_rng`'s state; the CUDA generator's onto ``device`` (a checkpoint written before
    ``cuda_device`` holds every GPU's generator under ``cuda``)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if device is not None and device.type == "cuda":
        if "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"], _index(device))
        elif "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])
