"""``dmgl train``: train with the paper's objective and record every seed in MLflow."""

from __future__ import annotations

import click

from dmgl_cli.cli.options import silent_option, tracking_option
from dmgl_cli.errors import DmglError


def _epoch_line(seed: int, epoch: int, total: int, m: dict[str, float]) -> str:
    parts = [
        f"seed {seed} epoch {epoch:>3}/{total}",
        f"alpha {m['alpha']:.3f}",
        f"loss {m['train_loss']:.3f}",
        f"val acc {m['val_acc']:.3f}",
    ]
    if "test_acc" in m:
        parts.append(f"test acc {m['test_acc']:.3f}")
    per_modality = [k for k in m if k.startswith("val_acc_")]
    if per_modality:
        parts.append("val " + " ".join(f"{k[8:]} {m[k]:.3f}" for k in per_modality))
    return "  ".join(parts)


@click.command()
@click.option(
    "--recipe", "-r", default="synthetic", show_default=True, help="Recipe name (see `dmgl recipes`) or YAML path."
)
@click.option(
    "--strategy",
    "-s",
    help="How alpha moves: constant, stepwise, heuristic or lb (learning-based; by "
    "default its first-order one-step look-ahead hypergradient, strategy.lb.approx=identity; "
    "strategy.lb.approx=cg for Eq. 3 with curvature). With a value: constant:0.5, stepwise:0.95.",
)
@click.option(
    "--alpha",
    type=float,
    help="alpha of --strategy constant (0 = plain Concat, 1 = matching only); alone it implies --strategy constant.",
)
@click.option(
    "--p",
    "p",
    type=float,
    help="p of --strategy stepwise: h(p) uses p, then 1 - p after half the epochs; "
    "alone it implies --strategy stepwise.",
)
@click.option("--method", "-m", help="Training method (default: the recipe's, normally concat).")
@click.option("--modality", help="For --method unimodal: the one modality to train (Table 1's uni-modal rows).")
@click.option("--seeds", default="1", show_default=True, help="Number of seeds (from train.seed up) or a list: 0,1,2.")
@click.option("--epochs", type=int, help="Shorthand for --set train.epochs=N.")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting, e.g. optim.lr=0.05."
)
@click.option("--experiment", help="MLflow experiment (default: the dataset's name).")
@click.option("--name", "run_name", help="Parent run name (default: METHOD-STRATEGY).")
@click.option("--resume", "resume_run", metavar="RUN_ID", help="Continue an interrupted run (seed or parent run id).")
@click.option(
    "--deterministic", is_flag=True, help="PyTorch determinism switches: bit-identical reruns (slower on GPU)."
)
@tracking_option
@silent_option
def train(
    recipe,
    strategy,
    alpha,
    p,
    method,
    modality,
    seeds,
    epochs,
    overrides,
    experiment,
    run_name,
    resume_run,
    deterministic,
    tracking_uri,
    silent,
) -> None:
    """Train with the paper's objective and record every seed in MLflow.

    \b
    Examples:
      dmgl train --recipe synthetic --strategy lb --seeds 3
      dmgl train --strategy constant --alpha 0          # plain Concat
      dmgl train --strategy constant:0.5                # the same as --strategy constant --alpha 0.5
      dmgl train --strategy stepwise --p 0.05
      dmgl train --strategy heuristic --set train.epochs=30
      dmgl train --method unimodal --modality slow --strategy constant --alpha 0
      dmgl train --strategy lb --set strategy.lb.approx=cg   # Eq. 3 by conjugate gradient (weight decay in H)
      dmgl train --method dmgl-official                   # Ours-LB as the authors' released code runs it
      dmgl train --resume 3f2a...                         # continue after a crash
    """
    from dmgl_cli import runner
    from dmgl_cli.config import parse_seeds, resolve
    from dmgl_cli.strategies import spec_from_flags
    from dmgl_cli.tracking import Tracker

    def progress(seed, epoch, total, metrics):
        if not silent:
            click.echo(_epoch_line(seed, epoch, total, metrics))

    if resume_run:
        given = [
            n
            for n, v in (
                ("--strategy", strategy),
                ("--alpha", alpha),
                ("--p", p),
                ("--method", method),
                ("--modality", modality),
                ("--epochs", epochs),
                ("--experiment", experiment),
                ("--name", run_name),
                ("--deterministic", deterministic or None),
            )
            if v is not None
        ]
        if overrides:
            given.append("--set")
        if given:
            raise DmglError(f"--resume continues a recorded run with its recorded config; drop {', '.join(given)}")
        outcome = runner.resume(resume_run, tracker=Tracker(tracking_uri), progress=progress)
    else:
        settings = {
            key: value
            for key, value in (
                ("train.epochs", epochs),
                ("experiment", experiment),
                ("train.deterministic", deterministic or None),
            )
            if value is not None
        }
        config = resolve(
            recipe,
            overrides,
            strategy=spec_from_flags(strategy, alpha, p),
            method=method,
            modality=modality,
            settings=settings,
        )
        seed_list = parse_seeds(seeds, config.train.seed)

        def announce(parent_id: str) -> None:
            if not silent:
                click.echo(
                    f"parent run {parent_id}: {config.method.name} / {config.strategy.name} on "
                    f"{config.dataset}, seeds {','.join(map(str, seed_list))}"
                )

        outcome = runner.train(
            config, seed_list, tracker=Tracker(tracking_uri), progress=progress, run_name=run_name, on_parent=announce
        )
    _print_outcome(outcome)


def _print_outcome(outcome) -> None:
    keys = ["test_acc", "test_map", "test_f1"]
    for seed in outcome.seeds:
        scores = "  ".join(f"{k} {seed.final.get(k, float('nan')):.4f}" for k in keys)
        modal = "  ".join(f"{k[5:]} {v:.4f}" for k, v in seed.final.items() if k.startswith("test_acc_"))
        click.echo(
            f"seed {seed.seed} (run {seed.run_id}): best epoch {int(seed.final['best_epoch'])}  {scores}  {modal}"
        )
    if outcome.summary:
        summary = "  ".join(
            f"{k} {outcome.summary[k + '_mean']:.4f} ± {outcome.summary[k + '_std']:.4f}"
            for k in keys + ["test_gap_acc"]
            if k + "_mean" in outcome.summary
        )
        click.echo(f"mean over {len(outcome.seeds)} seeds: {summary}")
    click.echo(f"parent run {outcome.parent_run_id} in experiment {outcome.experiment!r}; browse with `dmgl ui`")
