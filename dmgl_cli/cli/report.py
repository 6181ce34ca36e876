"""``dmgl report``: parse, call :func:`dmgl_cli.report.make_report`, print. The logic lives in :mod:`dmgl_cli.report`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dmgl_cli.cli.options import tracking_option
from dmgl_cli.errors import DmglError

_TABLES = ("main", "strategies", "ablation", "runs", "imbalance")
_FORMATS = ("text", "markdown", "latex", "csv", "json")
_PLOTS = ("alpha", "gap", "curves", "embeddings", "cd")
_TESTS = ("t", "wilcoxon")
_PROJECTIONS = ("pca", "umap")
_LABELS = ("code", "paper")


def _split_plots(values: tuple[str, ...]) -> list[str]:
    kinds = [k.strip() for value in values for k in value.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in _PLOTS]
    if unknown:
        raise DmglError(f"unknown plot {', '.join(unknown)}; valid: {', '.join(_PLOTS)}")
    return list(dict.fromkeys(kinds))


@click.command()
@click.option(
    "--table",
    "-t",
    type=click.Choice(_TABLES),
    help="main (methods x datasets), strategies (Table 4), ablation (Table 3), runs (one line per run), "
    "imbalance (Shapley value of test accuracy per modality, imbalance degree, params, FLOPs, s/epoch, peak memory). "
    "Default: main, unless only --plot is given.",
)
@click.option("--format", "-f", "fmt", type=click.Choice(_FORMATS), default="text", show_default=True)
@click.option("--experiment", "-e", "experiments", multiple=True, help="MLflow experiment(s) to read (default: all).")
@click.option("--dataset", "-d", "datasets", multiple=True, help="Only runs on this dataset (repeatable).")
@click.option("--sweep", help="Only the runs of this `dmgl sweep` study.")
@click.option(
    "--filter",
    "filter_string",
    metavar="MLFLOW_FILTER",
    help="Extra MLflow search filter, e.g. \"params.`optim.lr` = '0.05'\" or \"tags.`dmgl.method` = 'mla'\".",
)
@click.option(
    "--split",
    type=click.Choice(["test", "val"]),
    default="test",
    show_default=True,
    help="Which scores the tables show (all taken at the validation-selected epoch).",
)
@click.option(
    "--metric",
    type=click.Choice(["acc", "map", "f1"]),
    help="Metric of the strategies/ablation tables and plots (default: acc; ablation: MAP or F1).",
)
@click.option(
    "--plot",
    "plots",
    multiple=True,
    metavar="KINDS",
    help="alpha (Figure 3), gap (Figure 2 analogue), curves (validation per epoch), embeddings (Figure 2: each "
    "cell's best-on-validation seed's embeddings in 2-D and the modality gap per epoch; runs the checkpoints on "
    "--split), cd (Friedman test and Nemenyi critical-difference diagram of the rows' average ranks across "
    "datasets, on --metric); comma-separated or repeated.",
)
@click.option(
    "--projection",
    type=click.Choice(_PROJECTIONS),
    default="pca",
    show_default=True,
    help="2-D projection of --plot embeddings: pca (scikit-learn) or umap (needs umap-learn installed).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("dmgl-report"),
    show_default=True,
    help="Folder for the PNG figures.",
)
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write the table to this file instead of stdout.")
@click.option(
    "--labels",
    type=click.Choice(_LABELS),
    default="code",
    show_default=True,
    help="Row names: code (concat (LB), ogm-ge (const 0)) or paper (Concat, Ours-H, Ours-LB, OGM-GE, ...).",
)
@click.option(
    "--allow-mixed",
    is_flag=True,
    help="Let a cell hold runs whose settings differ beyond dataset, method and strategy (e.g. train.epochs, "
    "optim.lr, the dataset's checksum): it shows the configuration with the best mean validation score, with a note. "
    "Without it such a cell is refused, naming the settings that differ (a sweep's own tuned trials are always "
    "chosen on validation).",
)
@click.option(
    "--stats",
    is_flag=True,
    help="Compare every row with a reference row, pairing runs by seed: the difference with its 95% CI and a "
    "p-value, Holm-corrected across the table's rows; bold = best or not significantly worse; the note gives the "
    "seeds a 1-point difference needs at 80% power.",
)
@click.option(
    "--baseline",
    metavar="ROW",
    help="The reference row of --stats (its label, e.g. 'concat (const 0)'; in a strategies table a strategy "
    "such as 'const 0' or 'LB'). Default: the best row of each column. Implies --stats.",
)
@click.option(
    "--test",
    type=click.Choice(_TESTS),
    default="t",
    show_default=True,
    help="The paired test of --stats: t (paired t-test) or wilcoxon (signed-rank; the t-test stands in below 6 "
    "paired seeds).",
)
@tracking_option
def report(plots, fmt, output, tracking_uri, experiments, datasets, sweep, filter_string, **settings) -> None:
    """Paper-style tables and figures regenerated from the recorded runs.

    Seed runs are grouped by (dataset, method, strategy) and shown as mean ± std over seeds, in percent with two
    decimals, with the 95% t-interval of the mean after it; best bold, second best underlined. A cell nobody
    recorded prints as -. The table's notes (LaTeX: its caption) give the usual number of seeds; a cell over another
    number carries its own ([n=2]). Runs that differ in other settings never share a cell silently (see
    --allow-mixed); settings that differ between rows are noted. --stats says which differences are real.

    \b
    Examples:
      dmgl report                                       # Table 1 style, all experiments
      dmgl report --table strategies --format latex     # Table 4 / A3
      dmgl report --table ablation --dataset crema-d    # Table 3 / A2
      dmgl report --labels paper --format latex         # rows named Concat, Ours-H, Ours-LB, ...
      dmgl report --sweep cmp --table runs
      dmgl report --plot alpha --out figures/           # Figure 3
      dmgl report --plot gap,curves --dataset synthetic
      dmgl report --plot embeddings --dataset crema-d --labels paper   # Figure 2
      dmgl report --format json -o table.json
      dmgl report --stats --baseline "concat (const 0)"  # paired differences, p-values, power
      dmgl report --plot cd --metric acc                # Friedman + critical-difference diagram
    """
    from dmgl_cli.report import Selection, make_report, shown_table
    from dmgl_cli.tracking import Tracker

    kinds = _split_plots(plots)
    settings["table"] = shown_table(settings["table"], kinds, settings["stats"], settings["baseline"])
    result = make_report(
        Selection(list(experiments) or None, list(datasets) or None, sweep, filter_string),
        tracker=Tracker(tracking_uri),
        fmt=fmt,
        plot_kinds=kinds,
        color=output is None and fmt == "text" and sys.stdout.isatty(),
        **settings,  # the table, split, metric, labels and --stats settings, as make_report names them
    )
    _print_report(result, fmt, output)


def _print_report(result, fmt: str, output) -> None:
    """The report's warnings and notes (stderr), its text (stdout or ``output``) and the figures it wrote."""
    from dmgl_cli.paths import atomic_write_bytes

    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if fmt in ("csv", "latex"):  # text, markdown and json carry the notes inside the tables
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
    if result.text:
        if output is not None:
            atomic_write_bytes(output, result.text.encode())
            click.echo(f"wrote {output}", err=True)
        else:
            click.echo(result.text, nl=False)
    for path in result.plots:
        click.echo(f"wrote {path}", err=True)
