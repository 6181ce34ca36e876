"""Checkpoints: atomic writes, safe loads, RNG state capture.

A checkpoint is a dict of tensors and plain containers (no pickled objects), so it loads with
``torch.load(weights_only=True)``. It is written to a temporary file in the target folder, fsynced and renamed
over the old one: a crash leaves either the previous checkpoint or the new one, never a torn file. Leftover
temporary files from a crash are removed at the next save into the folder.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmgl_cli.errors import DmglError
from dmgl_cli.paths import atomic_write_bytes

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
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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
