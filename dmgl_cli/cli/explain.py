"""``dmgl explain``: GradCAM overlays of an image or video modality (the paper's Figure 4). The logic lives in
:mod:`dmgl_cli.explain`."""

from __future__ import annotations

from pathlib import Path

import click

from dmgl_cli.cli.options import json_option, tracking_option
from dmgl_cli.cli.output import echo_json
from dmgl_cli.errors import DmglError


def _parse_indices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DmglError(
            f"--indices takes test-split positions separated by commas (e.g. 0,5,12), got {text!r}"
        ) from None
    if not values:
        raise DmglError("--indices names no sample")
    return values


@click.command("explain")
@click.argument("run_id")
@click.option(
    "--compare", "compare", metavar="RUN_ID2", help="A second run drawn beside the first (e.g. Ours next to Concat)."
)
@click.option("--modality", "-m", help="The image or video modality to explain (default: the dataset's only one).")
@click.option("--samples", "-n", type=int, help="How many test samples, the first of each class in turn [default: 4].")
@click.option("--indices", metavar="I,J,K", help="These test-split positions (0-based) instead of --samples.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("dmgl-explain"),
    show_default=True,
    help="Folder for the PNG files.",
)
@tracking_option
@json_option
def explain(run_id, compare, modality, samples, indices, checkpoint, out_dir, tracking_uri, as_json) -> None:
    """GradCAM of an image or video modality for chosen test samples (Figure 4).

    The heat map is GradCAM (captum's LayerGradCam, ReLU applied) of the fused prediction's pre-softmax score
    for the sample's true class, taken at the modality encoder's last convolutional block, with the sample's other
    modalities held fixed; it is scaled to its maximum and laid over the input (a video: the middle one of the
    frames the model sees at evaluation). RUN_ID is a seed run, or a parent run (its seed with the best validation
    score); a run is named by its id, a unique prefix of the id (6+ characters) or its unique name. With --compare the overlays sit side by side: one row per sample, columns input | RUN_ID | RUN_ID2,
    each titled with the run's name as the paper gives it (Concat, Ours-LB, ...).

    Writes one overlay per run and sample and the grid into --out, and logs them to the runs (artifacts explain/).

    \b
    Examples:
      dmgl explain 3f2a9c...                                   # 4 test samples, one per class in turn
      dmgl explain CONCAT_RUN --compare OURS_RUN --indices 0,7,19 --out figures/
      dmgl explain 3f2a9c... --modality visual --samples 8 --checkpoint last
    """
    from dmgl_cli.tracking import Tracker

    tracker = Tracker(tracking_uri)
    # an unknown or ambiguous run is refused before torch loads
    run_id = tracker.find_run(run_id).run_id
    compare = tracker.find_run(compare).run_id if compare is not None else None

    from dmgl_cli.explain import explain as run_explain

    outcome = run_explain(
        run_id,
        tracker=tracker,
        compare=compare,
        modality=modality,
        samples=samples,
        indices=_parse_indices(indices),
        out_dir=out_dir,
        checkpoint=checkpoint,
    )
    if as_json:
        echo_json(
            {
                "modality": outcome.modality,
                "indices": outcome.positions,
                "files": [str(p) for p in outcome.files],
                "artifacts": outcome.logged,
            }
        )
        return
    for path in outcome.files:
        click.echo(f"wrote {path}")
    for logged_run, artifacts in outcome.logged.items():
        click.echo(f"logged {len(artifacts)} file(s) to run {logged_run} under explain/")
