"""The click group class shared by the root group and every command group (no import of the package ``__init__``)."""

from __future__ import annotations

import click

from dmgl_cli.errors import DmglError, Interrupted


class DmglGroup(click.Group):
    """Turns DmglError (anything a user can cause) into one clear message and exit code 1, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DmglError as exc:
            raise click.ClickException(str(exc)) from None
        except (KeyboardInterrupt, Interrupted) as exc:
            run_id = exc.run_id if isinstance(exc, Interrupted) else None
            if not (isinstance(exc, Interrupted) and exc.quiet):
                click.echo(
                    f"\nInterrupted: {f'run {run_id}' if run_id else 'the run'} was checkpointed and marked KILLED; "
                    f"continue it with `dmgl train --resume {run_id or 'RUN_ID'}`.",
                    err=True,
                )
            raise SystemExit(130) from None
