"""How commands print: one JSON document on stdout with ``--json`` (progress then goes to stderr), plain tables, the
MLflow UI link a command ends with, and the within-epoch progress bar of ``dmgl train``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any

import click

from dmgl_cli.run_queries import jsonable


def echo_json(document: Any) -> None:
    """One JSON document on stdout (non-finite floats as null, so ``jq`` reads it)."""
    click.echo(json.dumps(jsonable(document), indent=2, allow_nan=False))


class Messages:
    """Progress and messages: on stdout in text mode; on stderr with ``--json`` (stdout holds only the JSON);
    nowhere with ``--silent``."""

    def __init__(self, *, as_json: bool = False, silent: bool = False):
        self.as_json, self.silent = as_json, silent

    def __call__(self, text: str) -> None:
        if not self.silent:
            click.echo(text, err=self.as_json)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None) -> str:
    """Left-aligned columns separated by two spaces, under ``headers`` if given; None prints as '-'."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    if headers is not None:
        cells.insert(0, list(headers))
    if not cells:
        return ""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def score(value: float | None, std: float | None = None) -> str | None:
    if value is None:
        return None
    return f"{value:.4f}" if std is None else f"{value:.4f} ± {std:.4f}"


def paired_scores(
    columns: dict[str, list[float | None]], seed_counts: list[int] | None = None
) -> dict[str, list[str | None]]:
    """Metrics for display, one value per column: ``X`` and its spread ``X_std`` (a parent's mean over its seeds;
    ``X_mean`` in runs recorded by earlier versions) become one row ``X`` (mean ± std), or the mean alone in a column whose
    run has one seed (``seed_counts``, one per column: its std is 0 by definition)."""
    shown: dict[str, list[str | None]] = {}
    for key, values in columns.items():
        if key.endswith("_std") and (key[: -len("_std")] in columns or key[: -len("_std")] + "_mean" in columns):
            continue  # shown beside its mean
        stem = key[: -len("_mean")] if key.endswith("_mean") and key[: -len("_mean")] + "_std" in columns else key
        stds = columns.get(f"{stem}_std")
        if stds is not None:
            if seed_counts is not None:
                stds = [s if n != 1 else None for s, n in zip(stds, seed_counts, strict=True)]
            shown[stem] = [score(m, s) if s is not None else score(m) for m, s in zip(values, stds, strict=True)]
        else:
            shown[key] = [score(v) for v in values]
    return dict(sorted(shown.items()))


def view_line(url: str) -> str:
    return f"view: {url}"


# ------------------------------------------------------------------------------------------------ progress bar


def progress_bar_wanted(silent: bool, stream: IO[str] | None = None) -> bool:
    """A progress bar is drawn on ``stream`` (stderr) only when it is a terminal: never with ``--silent``, when
    stderr is redirected to a file or a pipe (logs, CI, a notebook's captured output) or on a dumb terminal.
    Piping stdout alone (``dmgl train --json | jq``) keeps the bar on the terminal's stderr."""
    if silent or os.environ.get("TERM") == "dumb":
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class BatchBar:
    """``step_progress(seed, epoch, batch, batches)`` as a tqdm bar on stderr: one bar per (seed, epoch), gone
    when the epoch's last batch is done (the epoch's line follows). Only integers reach it, so it never waits for
    the device; tqdm redraws at most ten times a second."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = sys.stderr if stream is None else stream
        self._bar: Any = None
        self._key: tuple[int, int] | None = None

    def __call__(self, seed: int, epoch: int, batch: int, batches: int) -> None:
        if self._bar is None or self._key != (seed, epoch):
            self.close()
            from tqdm import tqdm

            # A resumed run may start mid-epoch: the bar starts at the batches already done.
            self._bar = tqdm(
                total=batches,
                initial=batch - 1,
                desc=f"seed {seed} epoch {epoch}",
                unit="batch",
                leave=False,
                file=self.stream,
                dynamic_ncols=True,
            )
            self._key = (seed, epoch)
        self._bar.update(batch - self._bar.n)
        if batch >= batches:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._key = None, None

    def __enter__(self) -> BatchBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
