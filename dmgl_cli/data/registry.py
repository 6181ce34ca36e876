"""The dataset registry: ``<registry>/datasets.db`` (SQLite through sqlite-utils).

One row per prepared dataset: where it lives, its modalities and their shapes, classes, split sizes, checksum,
preparer version and when it was made. ``dmgl datasets`` lists it; ``dmgl train`` finds a dataset through it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.errors import DmglError
from dmgl_cli.paths import ensure_registry, registry_home

if TYPE_CHECKING:
    import sqlite_utils

TABLE = "datasets"


class DatasetRegistry:
    def __init__(self, home: Path | None = None):
        self.home = home or registry_home()
        self.path = self.home / "datasets.db"

    def _db(self) -> sqlite_utils.Database:
        import sqlite_utils  # here: it imports pandas (~0.35 s), which only writes need

        try:
            db = sqlite_utils.Database(self.path)
            db.execute("PRAGMA busy_timeout = 30000")
        except sqlite3.Error as exc:
            raise DmglError(f"dataset registry {self.path} cannot be opened ({exc})") from None
        return db

    def register(self, manifest: dict[str, Any], path: Path) -> dict[str, Any]:
        row = {
            "name": manifest["name"],
            "path": str(Path(path).resolve()),
            "preparer": manifest["preparer"],
            "preparer_version": manifest["preparer_version"],
            "modalities": json.dumps(manifest["modalities"]),
            "classes": json.dumps(manifest["classes"]),
            "num_classes": len(manifest["classes"]),
            "splits": json.dumps(manifest["splits"]),
            "checksum": manifest["checksum"],
            "bad_samples": len(manifest.get("bad_samples", [])),
            "created": manifest["created"],
        }
        ensure_registry(self.home)
        try:
            self._db().table(TABLE).upsert(row, pk="name")
        except sqlite3.Error as exc:
            raise DmglError(f"could not write the dataset registry {self.path} ({exc})") from None
        return row

    def _select(self, where: str = "", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows of the registry, read with the standard library (``dmgl train`` opens a dataset before its first
        step); a registry not made yet reads as empty, and reading never creates it."""
        if not self.path.exists():
            return []
        try:
            connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        except sqlite3.Error as exc:
            raise DmglError(f"dataset registry {self.path} cannot be opened ({exc})") from None
        try:
            connection.row_factory = sqlite3.Row
            if not connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
            ).fetchone():
                return []
            rows = connection.execute(f"SELECT * FROM [{TABLE}] {where} ORDER BY name", params).fetchall()
        except sqlite3.Error as exc:
            raise DmglError(f"dataset registry {self.path} cannot be read ({exc})") from None
        finally:
            connection.close()
        return [self._decode(dict(row)) for row in rows]

    def rows(self) -> list[dict[str, Any]]:
        return self._select()

    def get(self, name: str) -> dict[str, Any]:
        found = self._select("WHERE name = ?", (name,))
        if found:
            return found[0]
        known = [r["name"] for r in self.rows()]
        hint = f"registered: {', '.join(known)}" if known else "no dataset is registered yet"
        from dmgl_cli.data.preparers import PREPARERS

        # A name of the user's choosing (`--name sarcasm-clip`) is not a preparer: `dmgl prepare sarcasm-clip` fails.
        how = (
            f"`dmgl prepare {name}`"
            if name in PREPARERS
            else f"`dmgl prepare DATASET ... --name {name}` first (`dmgl recipes show RECIPE` shows the command)"
        )
        raise DmglError(
            f"dataset {name!r} is not prepared ({hint}); run {how}" + (" first" if name in PREPARERS else "")
        )

    def remove(self, name: str) -> None:
        self.get(name)
        self._db().table(TABLE).delete(name)

    @staticmethod
    def _decode(row: dict[str, Any]) -> dict[str, Any]:
        out = dict(row)
        for key in ("modalities", "classes", "splits"):
            out[key] = json.loads(out[key])
        return out


def open_dataset(name: str) -> PreparedDataset:
    """The prepared dataset registered as ``name``."""
    row = DatasetRegistry().get(name)
    path = Path(row["path"])
    if not path.is_dir():
        raise DmglError(
            f"dataset {name!r} is registered at {path}, which no longer exists; run `dmgl prepare {name}` again"
        )
    return PreparedDataset(path)
