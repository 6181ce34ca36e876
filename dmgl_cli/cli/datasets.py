"""``dmgl datasets``: list, show and verify the prepared datasets."""

from __future__ import annotations

import click

from dmgl_cli.cli.base import DmglGroup
from dmgl_cli.errors import DmglError


@click.group(cls=DmglGroup, invoke_without_command=True)
@click.pass_context
def datasets(ctx) -> None:
    """List the prepared datasets (`dmgl datasets`), or inspect and verify one.

    \b
    Examples:
      dmgl datasets
      dmgl datasets show synthetic
      dmgl datasets verify synthetic
    """
    if ctx.invoked_subcommand is None:
        from dmgl_cli.data.registry import DatasetRegistry

        rows = DatasetRegistry().rows()
        if not rows:
            click.echo("no dataset is prepared yet; try `dmgl prepare synthetic`")
            return
        for row in rows:
            splits = " ".join(f"{k}={v}" for k, v in row["splits"].items())
            click.echo(
                f"{row['name']:<20} {row['num_classes']:>3} classes  {splits:<32} "
                f"{','.join(row['modalities'])}  ({row['preparer']} v{row['preparer_version']}, {row['created']})"
            )


@datasets.command("show")
@click.argument("name")
def datasets_show(name) -> None:
    """Print a dataset's registry row."""
    import json

    from dmgl_cli.data.registry import DatasetRegistry

    click.echo(json.dumps(DatasetRegistry().get(name), indent=2))


@datasets.command("verify")
@click.argument("name")
def datasets_verify(name) -> None:
    """Re-check a prepared dataset's files against the checksums in its manifest."""
    from dmgl_cli.data.registry import open_dataset

    bad = open_dataset(name).verify()
    if bad:
        raise DmglError(
            f"dataset {name}: {len(bad)} files changed or missing: {', '.join(bad)}; run `dmgl prepare` again"
        )
    click.echo(f"dataset {name}: all files match their checksums")
