"""Where dmgl keeps things, and which names are safe to turn into paths.

The registry folder (``./registry`` by default, moved by ``DMGL_HOME``) holds everything dmgl writes:

    registry/
      mlflow.db        MLflow backend store (unless --tracking-uri / MLFLOW_TRACKING_URI names another)
      artifacts/       MLflow artifacts (checkpoints, alpha.csv, plots, config)
      optuna.db        Optuna storage for `dmgl sweep`
      datasets.db      dataset registry (sqlite-utils)
      datasets/<name>/ prepared datasets (memory-mappable arrays + manifest.json)
      journal/<run_id>/ what a run wrote to a tracking server that is not sent yet (dmgl_cli/tracking/journal.py)
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dmgl_cli.errors import DmglError

# Letters, digits, '.', '_', '-' only, not starting with '.', so a name can never climb out of its folder
# ('../x'), be absolute, or carry characters that URLs and shells treat specially ('#', '\\', spaces).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def safe_name(name: str, what: str) -> str:
    """Return ``name`` if it can be used as a file or folder name inside the registry, else raise DmglError."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise DmglError(
            f"{what} {name!r} is not allowed: use letters, digits, '.', '_' and '-' only "
            "(no '/', '\\', '#', '..', spaces or absolute paths), at most 100 characters"
        )
    return name


def registry_home() -> Path:
    """The registry folder: ``$DMGL_HOME`` or ``./registry``."""
    return Path(os.environ.get("DMGL_HOME") or "registry").expanduser().resolve()


def ensure_registry(home: Path | None = None) -> Path:
    """Create the registry folder if needed and check it is writable; return it."""
    home = home or registry_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise DmglError(
            f"the registry folder {home} is not writable ({exc.strerror or exc}); "
            "fix its permissions or point DMGL_HOME at a writable folder"
        ) from None
    return home


def datasets_dir(home: Path | None = None) -> Path:
    return (home or registry_home()) / "datasets"


def default_tracking_uri(home: Path | None = None) -> str:
    return f"sqlite:///{(home or registry_home()) / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the registry's own SQLite store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def journal_dir(home: Path | None = None) -> Path:
    """Where runs written to a tracking server keep their journals: local even when the store is remote."""
    return (home or registry_home()) / "journal"


def default_artifacts_dir(home: Path | None = None) -> Path:
    return (home or registry_home()) / "artifacts"


def default_optuna_storage(home: Path | None = None) -> str:
    return f"sqlite:///{(home or registry_home()) / 'optuna.db'}"


def repo_root() -> Path | None:
    """The git checkout this package runs from (a source tree or an editable install), or None when it runs from
    an installed wheel or an unpacked sdist: callers must not ask git about whatever repository happens to enclose
    site-packages or the current folder."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / ".git").exists() and (root / "pyproject.toml").is_file() else None


def recipes_dir() -> Path:
    """Built-in recipes: ``$DMGL_RECIPES``; else the package data ``dmgl_cli/recipes`` of an installed wheel (the
    wheel carries the top-level ``recipes/`` there, see ``[tool.setuptools.package-dir]`` in pyproject.toml); else
    ``recipes/`` beside the package, as in a checkout or an editable install, where the folder stays at the top."""
    override = os.environ.get("DMGL_RECIPES")
    if override:
        return Path(override).expanduser()
    packaged = importlib.resources.files("dmgl_cli") / "recipes"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "recipes"


_NETWORK_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "fuse.sshfs",
    "9p",
    "lustre",
    "gpfs",
    "ceph",
    "glusterfs",
    "fuse.glusterfs",
    "afs",
)


def network_filesystem(path: Path, mounts_table: Path = Path("/proc/mounts")) -> str | None:
    """The type of the network filesystem ``path`` lives on (from the mount table), or None for a local disk.

    SQLite's locking is unreliable over such filesystems, so a SQLite store there is warned about."""
    try:
        mounts = mounts_table.read_text().splitlines()
    except OSError:
        return None
    target, best, kind = str(Path(path).resolve()), "", None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and (target == fields[1] or target.startswith(fields[1].rstrip("/") + "/")):
            if len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind if kind in _NETWORK_FILESYSTEMS else None


def warn_if_shared_sqlite(path: Path, what: str, mounts_table: Path = Path("/proc/mounts")) -> None:
    """A SQLite file is safe for several processes on one machine, not on a network filesystem."""
    kind = network_filesystem(path.parent, mounts_table)
    if kind:
        logging.getLogger("dmgl").warning(
            "the %s %s is a SQLite file on a network filesystem (%s): SQLite's locks are unreliable there and "
            "concurrent writers can corrupt it. Use a PostgreSQL/MySQL URL (or, for Optuna, journal:PATH) to share "
            "it between machines.",
            what,
            path,
            kind,
        )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of one."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Have ``write`` fill a temporary file beside ``path`` (``.<name>.<random>.tmp``), fsync it and rename it over
    ``path``: readers see the old file or the new one, never half of one. Streaming into the file, rather than
    building the bytes first, keeps a large checkpoint from being held in memory twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_or_copy(source: Path, target: Path) -> bool:
    """Make ``target`` a hard link to ``source`` (one copy of the bytes on disk, whichever name is read), replacing
    it atomically; a copy where the filesystem cannot link them (another device, no hard links). True if linked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.link.tmp")
    staged.unlink(missing_ok=True)
    try:
        os.link(source, staged)
        linked = True
    except OSError:
        shutil.copyfile(source, staged)
        linked = False
    try:
        os.replace(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return linked
