"""Options and parsing helpers shared by several ``dmgl`` commands."""

from __future__ import annotations

import click

from dmgl_cli.errors import DmglError


def tracking_option(func):
    """``--tracking-uri`` (or $MLFLOW_TRACKING_URI): where the MLflow runs are recorded."""
    return click.option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI (a server or database). Default: sqlite:///<registry>/mlflow.db.",
    )(func)


def silent_option(func=None, *, help: str = "Print only the final result."):  # noqa: A002 - click's own name
    """``--silent``; use as ``@silent_option`` or ``@silent_option(help=...)``."""
    decorator = click.option("--silent", is_flag=True, help=help)
    return decorator if func is None else decorator(func)


def parse_assignments(values: tuple[str, ...], flag: str) -> dict[str, object]:
    """``KEY=VALUE`` strings to a dict, each VALUE read as YAML (a plain string when it is not valid YAML)."""
    import yaml

    parsed = {}
    for text in values:
        if "=" not in text:
            raise DmglError(f"{flag} {text!r} must look like KEY=VALUE")
        key, raw = text.split("=", 1)
        try:
            parsed[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed[key.strip()] = raw
    return parsed


def json_option(func=None, *, help: str = "Print the result as one JSON document on stdout; progress goes to stderr."):  # noqa: A002
    """``--json``: the command's result as one JSON document on stdout (``dmgl train --json ... | jq``)."""
    decorator = click.option("--json", "as_json", is_flag=True, help=help)
    return decorator if func is None else decorator(func)
