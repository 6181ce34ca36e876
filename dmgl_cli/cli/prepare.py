"""``dmgl prepare``: turn a dataset's raw files into a prepared, registered dataset."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from dmgl_cli.cli.options import parse_assignments, silent_option
from dmgl_cli.errors import DmglError

if TYPE_CHECKING:
    from tqdm import tqdm


@click.command()
@click.argument("dataset")
@click.option("--raw", type=click.Path(path_type=Path), help="Folder of the dataset's raw download.")
@click.option("--name", help="Register under this name (default: the dataset's name).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated data and seeded splits.")
@click.option("--workers", type=int, default=1, show_default=True, help="Parallel worker processes.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable raw files in the manifest instead of stopping.")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help="Preparer-specific setting.")
@click.option(
    "--split-file",
    "split_files",
    multiple=True,
    metavar="SPLIT=PATH",
    help="A split's sample list instead of the default split (crema-d: clip_id,label CSV); once per split.",
)
@click.option("--manifest", type=click.Path(path_type=Path), help="custom: CSV with one row per sample.")
@click.option(
    "--modality",
    "modality_kinds",
    multiple=True,
    metavar="COLUMN=KIND",
    help="custom: a manifest column holding a modality, and its kind (audio, video, image, text).",
)
@click.option("--text-model", help="Tokenizer for text modalities: a local model folder or a hub id.")
@silent_option
def prepare(
    dataset, raw, name, seed, workers, skip_bad, options, split_files, manifest, modality_kinds, text_model, silent
) -> None:
    """Turn a dataset's raw files into a prepared, registered dataset.

    Datasets: synthetic (no raw files), crema-d, kinetics-sounds, nvgesture, sarcasm, twitter2015, and custom (your
    own data, described by a CSV manifest). `-o KEY=VALUE` sets a preparer's options (frames, sizes, ...); an
    unknown key lists the valid ones with their defaults. A re-run after an interruption resumes.

    \b
    Examples:
      dmgl prepare synthetic
      dmgl prepare synthetic --name synthetic3 -o modalities=3
      dmgl prepare crema-d --raw ~/data/CREMA-D --workers 8
      dmgl prepare crema-d --raw ~/data/CREMA-D --split-file train=train.csv --split-file test=test.csv
      dmgl prepare sarcasm --raw ~/data/sarcasm --text-model bert-base-uncased
      dmgl prepare custom --manifest samples.csv --modality voice=audio --modality face=video
    """
    from dmgl_cli.prepare import prepare_dataset

    bars: dict[str, tqdm] = {}

    def progress(done: int, total: int, description: str) -> None:
        if silent:
            return
        bar = bars.get(description)
        if bar is None:
            from tqdm import tqdm

            bar = bars[description] = tqdm(
                total=total, initial=done, desc=f"  {description}", unit="sample", mininterval=0.5, dynamic_ncols=True
            )
        bar.update(done - bar.n)

    settings = _preparer_options(dataset, options, split_files, manifest, modality_kinds, text_model)
    try:
        manifest, path = prepare_dataset(
            dataset,
            raw=raw,
            name=name,
            seed=seed,
            workers=workers,
            skip_bad=skip_bad,
            options=settings,
            progress=progress,
        )
    except KeyboardInterrupt:
        click.echo(
            "\nInterrupted: the samples prepared so far are kept; run the same command again to resume.", err=True
        )
        raise SystemExit(130) from None
    finally:
        for bar in bars.values():
            bar.close()
    _print_prepared(manifest, path)


def _preparer_options(dataset, options, split_files, manifest, modality_kinds, text_model) -> dict:
    """The preparer's options: ``-o KEY=VALUE`` and the flags that stand for one (each given once, and only to a
    dataset whose preparer takes it)."""
    settings = parse_assignments(options, "--option")
    flags = {
        "split_files": ("--split-file", parse_assignments(split_files, "--split-file") if split_files else None),
        "manifest": ("--manifest", str(manifest) if manifest else None),
        "modalities": ("--modality", parse_assignments(modality_kinds, "--modality") if modality_kinds else None),
        "text_model": ("--text-model", text_model),
    }
    for key, (flag, value) in flags.items():
        if value is None:
            continue
        if key in settings:
            raise DmglError(f"{flag} and -o {key}=... both set the same thing; give one")
        from dmgl_cli.data.preparers import PREPARERS

        if dataset in PREPARERS and key not in PREPARERS[dataset].OPTIONS:
            raise DmglError(f"{flag} does not apply to `dmgl prepare {dataset}`")
        settings[key] = value
    return settings


def _print_prepared(manifest: dict, path) -> None:
    """What was prepared: classes, splits, shapes, the samples skipped as unreadable, and where it is stored."""
    splits = ", ".join(f"{k} {v}" for k, v in manifest["splits"].items())
    shapes = ", ".join(f"{m} {tuple(s['shape'])}" for m, s in manifest["modalities"].items())
    click.echo(f"prepared {manifest['name']}: {len(manifest['classes'])} classes; {splits}; {shapes}")
    if manifest["bad_samples"]:
        click.echo(f"skipped {len(manifest['bad_samples'])} unreadable samples (listed in {path / 'manifest.json'})")
        for record in manifest["bad_samples"][:20]:
            click.echo(f"  {record['path']}: {record['reason']}")
        if len(manifest["bad_samples"]) > 20:
            click.echo(f"  ... and {len(manifest['bad_samples']) - 20} more")
    click.echo(f"stored in {path}")
