"""The ``dmgl`` command line: parse, call one function, print. No training logic lives here."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import click

from dmgl_cli import __version__
from dmgl_cli.errors import DmglError, Interrupted


class DmglGroup(click.Group):
    """Turns DmglError (anything a user can cause) into one clear message and exit code 1, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DmglError as exc:
            raise click.ClickException(str(exc)) from None
        except (KeyboardInterrupt, Interrupted):
            click.echo("\nInterrupted: the run was checkpointed and marked KILLED; continue it with "
                       "`dmgl train --resume RUN_ID`.", err=True)
            raise SystemExit(130) from None


def tracking_option(func):
    return click.option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI (a server or database). Default: sqlite:///<registry>/mlflow.db.",
    )(func)


def silent_option(func):
    return click.option("--silent", is_flag=True, help="Print only the final result.")(func)


def _parse_assignments(values: tuple[str, ...], flag: str) -> dict[str, object]:
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


@click.group(cls=DmglGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dmgl")
def cli() -> None:
    """dmgl — Dynamic Modality Gap Learning for imbalanced multimodal classification.

    Trains a multimodal classifier on (1 - alpha) * cross-entropy + alpha * modality matching, with alpha
    constant, stepwise, heuristic or learned by bilevel optimisation (NeurIPS 2024), and records every run in
    MLflow under ./registry (or $DMGL_HOME).

    \b
    Quick start:
      dmgl prepare synthetic
      dmgl train --recipe synthetic --strategy lb --seeds 3
      dmgl ui
    """
    _route_warnings()


def _route_warnings() -> None:
    """dmgl's warnings (stale runs, storages that cannot be shared) go to stderr as one line each."""
    import logging

    log = logging.getLogger("dmgl")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        log.propagate = False


# --------------------------------------------------------------------------------------------------- prepare


@cli.command()
@click.argument("dataset")
@click.option("--raw", type=click.Path(path_type=Path), help="Folder of the dataset's raw download.")
@click.option("--name", help="Register under this name (default: the dataset's name).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated data and seeded splits.")
@click.option("--workers", type=int, default=1, show_default=True, help="Parallel worker processes.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable raw files in the manifest instead of stopping.")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help="Preparer-specific setting.")
@click.option("--split-file", "split_files", multiple=True, metavar="SPLIT=PATH",
              help="A split's sample list instead of the default split (crema-d: clip_id,label CSV); once per split.")
@click.option("--manifest", type=click.Path(path_type=Path), help="custom: CSV with one row per sample.")
@click.option("--modality", "modality_kinds", multiple=True, metavar="COLUMN=KIND",
              help="custom: a manifest column holding a modality, and its kind (audio, video, image, text).")
@click.option("--text-model", help="Tokenizer for text modalities: a local model folder or a hub id.")
@silent_option
def prepare(dataset, raw, name, seed, workers, skip_bad, options, split_files, manifest, modality_kinds, text_model,
            silent) -> None:
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

    bars: dict[str, object] = {}

    def progress(done: int, total: int, description: str) -> None:
        if silent:
            return
        bar = bars.get(description)
        if bar is None:
            from tqdm import tqdm

            bar = bars[description] = tqdm(total=total, initial=done, desc=f"  {description}", unit="sample",
                                           mininterval=0.5, dynamic_ncols=True)
        bar.update(done - bar.n)

    settings = _parse_assignments(options, "--option")
    flags = {
        "split_files": ("--split-file", _parse_assignments(split_files, "--split-file") if split_files else None),
        "manifest": ("--manifest", str(manifest) if manifest else None),
        "modalities": ("--modality", _parse_assignments(modality_kinds, "--modality") if modality_kinds else None),
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
    try:
        manifest, path = prepare_dataset(dataset, raw=raw, name=name, seed=seed, workers=workers, skip_bad=skip_bad,
                                         options=settings, progress=progress)
    except KeyboardInterrupt:
        click.echo("\nInterrupted: the samples prepared so far are kept; run the same command again to resume.",
                   err=True)
        raise SystemExit(130) from None
    finally:
        for bar in bars.values():
            bar.close()
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


# -------------------------------------------------------------------------------------------------- datasets


@cli.group(cls=DmglGroup, invoke_without_command=True)
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
            click.echo(f"{row['name']:<20} {row['num_classes']:>3} classes  {splits:<32} "
                       f"{','.join(row['modalities'])}  ({row['preparer']} v{row['preparer_version']}, {row['created']})")


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
    from dmgl_cli.runner import open_dataset

    bad = open_dataset(name).verify()
    if bad:
        raise DmglError(f"dataset {name}: {len(bad)} files changed or missing: {', '.join(bad)}; run `dmgl prepare` again")
    click.echo(f"dataset {name}: all files match their checksums")


# ----------------------------------------------------------------------------------------------------- train


def _epoch_line(seed: int, epoch: int, total: int, m: dict[str, float]) -> str:
    parts = [f"seed {seed} epoch {epoch:>3}/{total}", f"alpha {m['alpha']:.3f}", f"loss {m['train_loss']:.3f}",
             f"val acc {m['val_acc']:.3f}"]
    if "test_acc" in m:
        parts.append(f"test acc {m['test_acc']:.3f}")
    per_modality = [k for k in m if k.startswith("val_acc_")]
    if per_modality:
        parts.append("val " + " ".join(f"{k[8:]} {m[k]:.3f}" for k in per_modality))
    return "  ".join(parts)


@cli.command()
@click.option("--recipe", "-r", default="synthetic", show_default=True, help="Recipe name (see `dmgl recipes`) or YAML path.")
@click.option("--strategy", "-s", help="How alpha moves: constant, stepwise, heuristic or lb (learning-based; by "
              "default its first-order one-step look-ahead hypergradient, strategy.lb.approx=identity; "
              "strategy.lb.approx=cg for Eq. 3 with curvature).")
@click.option("--alpha", type=float, help="alpha for --strategy constant (0 = plain Concat, 1 = matching only).")
@click.option("--p", "p", type=float, help="p for --strategy stepwise: h(p) uses p, then 1 - p after half the epochs.")
@click.option("--method", "-m", help="Training method (default: the recipe's, normally concat).")
@click.option("--modality", help="For --method unimodal: the one modality to train (Table 1's uni-modal rows).")
@click.option("--seeds", default="1", show_default=True, help="Number of seeds (from train.seed up) or a list: 0,1,2.")
@click.option("--epochs", type=int, help="Shorthand for --set train.epochs=N.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting, e.g. optim.lr=0.05.")
@click.option("--experiment", help="MLflow experiment (default: the dataset's name).")
@click.option("--name", "run_name", help="Parent run name (default: METHOD-STRATEGY).")
@click.option("--resume", "resume_run", metavar="RUN_ID", help="Continue an interrupted run (seed or parent run id).")
@click.option("--deterministic", is_flag=True, help="PyTorch determinism switches: bit-identical reruns (slower on GPU).")
@tracking_option
@silent_option
def train(recipe, strategy, alpha, p, method, modality, seeds, epochs, overrides, experiment, run_name, resume_run,
          deterministic, tracking_uri, silent) -> None:
    """Train with the paper's objective and record every seed in MLflow.

    \b
    Examples:
      dmgl train --recipe synthetic --strategy lb --seeds 3
      dmgl train --strategy constant --alpha 0          # plain Concat
      dmgl train --strategy stepwise --p 0.05
      dmgl train --strategy heuristic --set train.epochs=30
      dmgl train --method unimodal --modality slow --strategy constant --alpha 0
      dmgl train --strategy lb --set strategy.lb.approx=cg   # Eq. 3 by conjugate gradient (weight decay in H)
      dmgl train --method dmgl-official                   # Ours-LB as the authors' released code runs it
      dmgl train --resume 3f2a...                         # continue after a crash
    """
    from dmgl_cli import runner
    from dmgl_cli.config import load_config, parse_seeds

    def progress(seed, epoch, total, metrics):
        if not silent:
            click.echo(_epoch_line(seed, epoch, total, metrics))

    if resume_run:
        given = [n for n, v in (("--strategy", strategy), ("--alpha", alpha), ("--p", p), ("--method", method),
                                ("--modality", modality),
                                ("--epochs", epochs), ("--experiment", experiment), ("--name", run_name),
                                ("--deterministic", deterministic or None)) if v is not None]
        if overrides:
            given.append("--set")
        if given:
            raise DmglError(f"--resume continues a recorded run with its recorded config; drop {', '.join(given)}")
        outcome = runner.resume(resume_run, tracking_uri=tracking_uri, progress=progress)
    else:
        settings = list(overrides)
        if strategy is not None:
            settings.append(f"strategy.name={strategy}")
        if method is not None:
            settings.append(f"method.name={method}")
            if strategy is None:
                from dmgl_cli.methods import published_strategy_settings

                settings = published_strategy_settings(method) + settings
        if epochs is not None:
            settings.append(f"train.epochs={epochs}")
        if deterministic:
            settings.append("train.deterministic=true")
        if modality is not None:
            settings.append(f"method.options.unimodal.modality='{modality}'")
        if experiment is not None:
            settings.append(f"experiment={experiment}")
        config = load_config(recipe, settings)
        if modality is not None and config.method.name != "unimodal":
            raise DmglError(f"--modality picks the one modality of --method unimodal; method {config.method.name!r} "
                            "uses every modality, drop --modality")
        if alpha is not None:
            if config.strategy.name != "constant":
                raise DmglError(f"--alpha applies to --strategy constant, not {config.strategy.name} "
                                "(for lb, set strategy.lb.initial_alpha)")
            settings.append(f"strategy.alpha={alpha}")
        if p is not None:
            if config.strategy.name != "stepwise":
                raise DmglError(f"--p applies to --strategy stepwise, not {config.strategy.name}")
            settings.append(f"strategy.p={p}")
        config = load_config(recipe, settings)
        seed_list = parse_seeds(seeds, config.train.seed)

        def announce(parent_id: str) -> None:
            if not silent:
                click.echo(f"parent run {parent_id}: {config.method.name} / {config.strategy.name} on "
                           f"{config.dataset}, seeds {','.join(map(str, seed_list))}")

        outcome = runner.train(config, seed_list, tracking_uri=tracking_uri, progress=progress, run_name=run_name,
                               on_parent=announce)
    _print_outcome(outcome)


def _print_outcome(outcome) -> None:
    keys = ["test_acc", "test_map", "test_f1"]
    for seed in outcome.seeds:
        scores = "  ".join(f"{k} {seed.final.get(k, float('nan')):.4f}" for k in keys)
        modal = "  ".join(f"{k[5:]} {v:.4f}" for k, v in seed.final.items() if k.startswith("test_acc_"))
        click.echo(f"seed {seed.seed} (run {seed.run_id}): best epoch {int(seed.final['best_epoch'])}  {scores}  {modal}")
    if outcome.summary:
        summary = "  ".join(
            f"{k} {outcome.summary[k + '_mean']:.4f} ± {outcome.summary[k + '_std']:.4f}"
            for k in keys + ["test_gap_acc"] if k + "_mean" in outcome.summary
        )
        click.echo(f"mean over {len(outcome.seeds)} seeds: {summary}")
    click.echo(f"parent run {outcome.parent_run_id} in experiment {outcome.experiment!r}; browse with `dmgl ui`")


# ------------------------------------------------------------------------------------------------------ eval


@cli.command("eval")
@click.argument("run_id")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@tracking_option
def eval_command(run_id, checkpoint, split, tracking_uri) -> None:
    """Re-score a run's checkpoint and record the result on the run.

    RUN_ID is a seed run, or a parent run (then every seed is scored). The recorded config and the prepared
    dataset rebuild the model exactly; the output compares with what training logged.

    \b
    Examples:
      dmgl eval 3f2a9c...
      dmgl eval 3f2a9c... --checkpoint last --split val
    """
    from dmgl_cli.runner import evaluate_run

    for outcome in evaluate_run(run_id, checkpoint=checkpoint, split=split, tracking_uri=tracking_uri):
        m = outcome.metrics
        line = "  ".join(f"{k} {m[f'{split}_{k}']:.4f}" for k in ("acc", "map", "f1"))
        diff = outcome.max_abs_diff
        match = "no logged values to compare" if diff is None else (
            "matches the logged metrics exactly" if diff == 0 else f"max |diff| vs logged {diff:.2e}")
        click.echo(f"run {outcome.run_id} seed {outcome.seed} {checkpoint}.pt on {split}: {line}  ({match})")


# ------------------------------------------------------------------------------------------------------ runs


@cli.group(cls=DmglGroup)
def runs() -> None:
    """Housekeeping of recorded runs."""


@runs.command("reconcile")
@click.option("--experiment", help="Only this MLflow experiment (default: all).")
@click.option("--older-than", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Minutes without a heartbeat after which a run from another machine counts as dead.")
@tracking_option
def runs_reconcile(experiment, older_than, tracking_uri) -> None:
    """Mark runs KILLED that are recorded as RUNNING but whose process is gone (SIGKILL, OOM, lost machine).

    On this machine the recorded process id is checked; runs from other machines count as dead after
    --older-than minutes without a heartbeat (one per epoch). They stay resumable with `dmgl train --resume`.

    \b
    Examples:
      dmgl runs reconcile
      dmgl runs reconcile --experiment crema-d --older-than 120
    """
    from dmgl_cli.runner import reconcile

    settled = reconcile(experiment=experiment, older_than_minutes=older_than, tracking_uri=tracking_uri)
    for run in settled:
        click.echo(f"marked KILLED: {run.info.run_id} ({run.info.run_name}, {run.data.tags.get('dmgl.role', '?')})")
    click.echo(f"{len(settled)} stale run(s) settled")


# -------------------------------------------------------------------------------------------------------- ui


@cli.command()
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
    from dmgl_cli.tracking import launch_ui, resolve_tracking_uri

    if host not in ("127.0.0.1", "localhost", "::1"):
        if not allow_remote:
            raise DmglError(f"--host {host} exposes the MLflow UI beyond this machine; add --allow-remote to confirm")
        click.echo("warning: the MLflow UI has no authentication unless you configure it; anyone who can reach "
                   f"{host}:{port} can read and delete your runs", err=True)
    # MLflow 3's UI opens in its GenAI view; this link opens the "Model training" view, where runs and charts are.
    click.echo(f"MLflow UI over {resolve_tracking_uri(tracking_uri)}: "
               f"http://{host}:{port}/#/experiments?workflowType=machine_learning  (Ctrl-C to stop)")
    raise SystemExit(launch_ui(tracking_uri, host, port))


# --------------------------------------------------------------------------------------------------- recipes


@cli.group(cls=DmglGroup, invoke_without_command=True)
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


main = functools.partial(cli, prog_name="dmgl")

from dmgl_cli.cli_report import report  # noqa: E402
from dmgl_cli.cli_sweep import sweep  # noqa: E402

cli.add_command(sweep)
cli.add_command(report)
