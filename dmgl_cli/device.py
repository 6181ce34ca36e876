"""Where tensors live and how runs are made repeatable: device choice, autocast, batch transfer, seeding.

Shared by the trainer, ``dmgl eval`` and the methods' own data passes, so that each computes in the same precision on
the same device as training does.
"""

from __future__ import annotations

import os
import random
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dmgl_cli.errors import DmglError


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DmglError(f"train.device={name} but CUDA is not available here; use --set train.device=cpu or auto")
    return torch.device(name)


def device_in_use(name: str) -> str:
    """The device ``train.device`` = ``name`` resolves to here, as recorded on a run (tag ``dmgl.device``):
    ``cpu``, or ``cuda:N (GPU name)``; ``auto`` and ``cuda`` name no index, so the current one is written."""
    device = pick_device(name)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def configure_determinism(enabled: bool) -> None:
    """PyTorch's determinism switches (and cuBLAS's workspace setting) for bit-identical reruns."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.are_deterministic_algorithms_enabled():
        # only when on: use_deterministic_algorithms imports torch._inductor (and torch._dynamo, ~1.3 s) every call
        torch.use_deterministic_algorithms(False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict[str, Any], device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """A loader batch's (inputs by modality, labels) on ``device``."""
    non_blocking = device.type == "cuda"
    inputs = {m: t.to(device, non_blocking=non_blocking) for m, t in batch["inputs"].items()}
    return inputs, batch["labels"].to(device, non_blocking=non_blocking)


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bf16 autocast on CUDA only: CPU runs stay in fp32, so that their results reproduce exactly."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
