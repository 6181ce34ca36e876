"""``dmgl prepare``: run a dataset's preparer and register the result."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmgl_cli.data.preparers import PREPARERS, PrepareJob
from dmgl_cli.data.preparers.base import resolve_options
from dmgl_cli.data.registry import DatasetRegistry
from dmgl_cli.errors import DmglError
from dmgl_cli.paths import datasets_dir, ensure_registry, safe_name


def prepare_dataset(
    dataset: str,
    *,
    raw: Path | None = None,
    name: str | None = None,
    seed: int = 0,
    workers: int = 1,
    skip_bad: bool = False,
    options: dict[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    if dataset not in PREPARERS:
        raise DmglError(f"unknown dataset {dataset!r}; preparers: {', '.join(PREPARERS)}")
    if workers < 1:
        raise DmglError(f"--workers must be >= 1, got {workers}")
    preparer = PREPARERS[dataset]
    name = safe_name(name or dataset, "dataset name")
    if raw is not None:
        raw = Path(raw).expanduser().resolve()
        if not raw.is_dir():
            raise DmglError(f"raw folder {raw} does not exist or is not a folder")
    home = ensure_registry()
    destination = datasets_dir(home) / name
    destination.parent.mkdir(parents=True, exist_ok=True)
    job = PrepareJob(
        name=name,
        destination=destination,
        raw=raw,
        seed=seed,
        workers=workers,
        skip_bad=skip_bad,
        options=resolve_options(preparer.OPTIONS, options or {}, dataset),
        progress=progress or (lambda done, total, description: None),
    )
    try:
        manifest = preparer.prepare(job)
    except OSError as exc:
        # Disk full (ENOSPC), a file-size limit (EFBIG), a quota: the samples decoded so far stay in the work
        # folder, so the same command resumes once there is room.
        culprit = f" ({exc.filename})" if exc.filename else ""
        advice = (
            "; free some space there (or point DMGL_HOME at a larger disk) and run the same command again to resume"
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            else ""
        )
        raise DmglError(
            f"preparing {name} failed while writing under {destination.parent}{culprit}: {exc.strerror or exc}{advice}"
        ) from None
    DatasetRegistry(home).register(manifest, destination)
    return manifest, destination
