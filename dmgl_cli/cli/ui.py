"""``dmgl ui``: the MLflow UI over the registry."""

from __future__ import annotations

import click

from dmgl_cli.cli.options import tracking_option
from dmgl_cli.errors import DmglError


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--allow-remote", is_flag=True, help="Required to bind anything but a loopback address.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Server worker processes (each holds its own copy of MLflow, ~250 MB).",
)
@click.option(
    "--access-log",
    is_flag=True,
    help="Show the server's request log and start-up messages (quiet by default: its warnings and errors only).",
)
@tracking_option
def ui(port, host, allow_remote, workers, access_log, tracking_uri) -> None:
    """Serve the MLflow UI over the registry (127.0.0.1 only unless --allow-remote).

    The link is printed once the server answers; Ctrl-C (or SIGTERM, SIGHUP) stops the server and all its
    processes. The UI opens on the runs of the experiment you trained in last, in MLflow's "Model training" view.
    While it runs, the links other commands print (`dmgl train` as the run starts, `runs show`, ...) point at
    its port.

    \b
    Examples:
      dmgl ui
      dmgl ui --port 5001
      dmgl ui --access-log     # every request, as `mlflow ui` logs it
    """
    from dmgl_cli.links import experiment_runs_url, experiments_url
    from dmgl_cli.ui_server import Address, serve

    if host not in ("127.0.0.1", "localhost", "::1"):
        if not allow_remote:
            raise DmglError(f"--host {host} exposes the MLflow UI beyond this machine; add --allow-remote to confirm")
        click.echo(
            "warning: the MLflow UI has no authentication unless you configure it; anyone who can reach "
            f"{host}:{port} can read and delete your runs",
            err=True,
        )

    def starting(uri: str) -> None:
        click.echo(f"starting the MLflow UI over {uri} on {host}:{port} ...", err=True)

    def ready(address: Address, experiment_id: str | None, seconds: float) -> None:
        base = address.base_url
        link = experiment_runs_url(base, experiment_id) if experiment_id is not None else experiments_url(base)
        click.echo(f"MLflow UI ready after {seconds:.0f} s: {link}  (Ctrl-C to stop)")
        if experiment_id is not None:
            click.echo(f"all experiments: {experiments_url(base)}")

    def stopped(signal_name: str) -> None:
        click.echo(f"{signal_name}: stopped the MLflow UI", err=True)

    raise SystemExit(
        serve(
            tracking_uri,
            host,
            port,
            workers,
            access_log=access_log,
            on_start=starting,
            on_ready=ready,
            on_stop=stopped,
        )
    )
