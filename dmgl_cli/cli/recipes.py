"""``dmgl recipes``: list, show and copy the built-in recipes."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from dmgl_cli.cli.base import DmglGroup
from dmgl_cli.errors import DmglError


@click.group(cls=DmglGroup, invoke_without_command=True)
@click.pass_context
def recipes(ctx) -> None:
    """List the built-in recipes, show one, or copy one to edit.

    \b
    Examples:
      dmgl recipes
      dmgl recipes show synthetic
      dmgl recipes copy synthetic my-synthetic.yaml && dmgl train --recipe my-synthetic.yaml
    """
    if ctx.invoked_subcommand is None:
        from dmgl_cli.config import available_recipes, recipe_path

        for name in available_recipes():
            first = recipe_path(name).read_text().splitlines()[0].lstrip("# ").strip()
            click.echo(f"{name:<18} {first}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name) -> None:
    """Print a recipe."""
    from dmgl_cli.config import recipe_path

    click.echo(recipe_path(name).read_text(), nl=False)


@recipes.command("copy")
@click.argument("name")
@click.argument("destination", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite DESTINATION if it exists.")
def recipes_copy(name, destination, force) -> None:
    """Copy a built-in recipe to DESTINATION to edit it."""
    from dmgl_cli.config import recipe_path

    source = recipe_path(name)
    if destination.is_dir():
        destination = destination / source.name
    if destination.exists() and not force:
        raise DmglError(f"{destination} exists; pass --force to overwrite it")
    shutil.copyfile(source, destination)
    click.echo(f"copied {name} to {destination}; train with `dmgl train --recipe {destination}`")
