"""``dmgl ui``: the MLflow UI over the registry."""

from __future__ import annotations

import click

from dmgl_cli.cli.options import tracking_option
from dmgl_cli.errors import DmglError


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--allow-remote", is_flag=True, help="Required to bind anything but a loopback address.")
@tracking_option
def ui(port, host, allow_remote, tracking_uri) -> None:
    """Open the MLflow UI over the registry (127.0.0.1 only unless --allow-remote).

    \b
    Examples:
      dmgl ui
      dmgl ui --port 5001
    """
    from dmgl_cli.paths import resolve_tracking_uri
    from dmgl_cli.ui_server import launch_ui

    if host not in ("127.0.0.1", "localhost", "::1"):
        if not allow_remote:
            raise DmglError(f"--host {host} exposes the MLflow UI beyond this machine; add --allow-remote to confirm")
        click.echo(
            "warning: the MLflow UI has no authentication unless you configure it; anyone who can reach "
            f"{host}:{port} can read and delete your runs",
            err=True,
        )
    # MLflow 3's UI opens in its GenAI view; this link opens the "Model training" view, where runs and charts are.
    click.echo(
        f"MLflow UI over {resolve_tracking_uri(tracking_uri)}: "
        f"http://{host}:{port}/#/experiments?workflowType=machine_learning  (Ctrl-C to stop)"
    )
    raise SystemExit(launch_ui(tracking_uri, host, port))
