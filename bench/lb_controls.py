"""Does learning alpha help? Ours-LB's estimators against the controls a reviewer asks for, paired over seeds.

Rows (``--rows`` picks them by label): Concat (alpha 0), Ours-H (the heuristic schedule), Ours-LB with each
hypergradient estimator (``strategy.lb.estimator`` forward, epoch, step), and the controls: ``linear:0.05`` (alpha
falls by 0.05 per epoch from 0.5: what Adam on an always-positive hypergradient does), ``lb:fixed-sign`` (Ours-LB,
its 5% held-out outer data included, with the hypergradient replaced by +1: the same walk as linear, on the same
training data as Ours-LB) and ``lb:random-sign``. The estimator never changes what a step trains, only where alpha
goes, so the controls run with the cheapest one (step).

Every row trains seeds 0..N-1 through the real run.training into the registry ``DMGL_HOME`` names (so ``dmgl report
--stats`` reads the same runs), and the script prints test ACC mean +- std and each row's paired difference to the
reference row (``--reference``) over the same seeds: mean, 95% t-interval, paired t-test and Wilcoxon signed-rank
p-values (scipy.stats), Holm-corrected across the rows.

    DMGL_HOME=/tmp/dmgl-acc python bench/lb_controls.py --datasets synthetic --seeds 10
    DMGL_HOME=/tmp/dmgl-acc python bench/lb_controls.py --datasets digits-av --seeds 10 --rows "Ours-LB forward,LB fixed sign"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402

STEP = ["strategy.lb.estimator=step", "strategy.lb.approx=identity"]
ROWS: dict[str, list[str]] = {
    "Concat": ["strategy.name=constant", "strategy.alpha=0"],
    "Ours-H": ["strategy.name=heuristic"],
    "Ours-LB forward": ["strategy.name=lb", "strategy.lb.estimator=forward"],
    "Ours-LB epoch": ["strategy.name=lb", "strategy.lb.estimator=epoch"],
    "Ours-LB forward run": ["strategy.name=lb", "strategy.lb.estimator=forward", "strategy.lb.horizon=run"],
    "Ours-LB epoch run": ["strategy.name=lb", "strategy.lb.estimator=epoch", "strategy.lb.horizon=run"],
    "Ours-LB average": ["strategy.name=lb", "strategy.lb.estimator=average"],
    "Ours-LB step": ["strategy.name=lb", *STEP],
    "linear 0.05": ["strategy.name=linear", "strategy.linear_rate=0.05"],
    "LB fixed sign": ["strategy.name=lb", "strategy.lb.direction=fixed", *STEP],
    "LB random sign": ["strategy.name=lb", "strategy.lb.direction=random", *STEP],
}


DEFAULT_ROWS = [label for label in ROWS if not label.endswith(" run")]


def _per_seed(config, seeds: int, name: str) -> tuple[dict[int, float], dict[int, float], float]:
    """Test ACC and final alpha per seed, through run.training (one parent run); and the seconds it took."""
    from dmgl_cli.run import training
    from dmgl_cli.tracking import Tracker

    started = time.perf_counter()
    tracker = Tracker()
    outcome = training.train(config, list(range(seeds)), tracker=tracker, run_name=name)
    accuracy, alpha = {}, {}
    for seed_outcome in outcome.seeds:
        accuracy[seed_outcome.seed] = seed_outcome.final["test_acc"]
        history = tracker.metric_history(seed_outcome.run_id, "alpha")
        if history:
            alpha[seed_outcome.seed] = history[-1][1]
    return accuracy, alpha, time.perf_counter() - started


def _holm(p_values: list[float]) -> list[float]:
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def main() -> None:
    from scipy import stats

    from dmgl_cli.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="synthetic,digits-av")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated labels of {', '.join(ROWS)}")
    parser.add_argument("--reference", default="LB fixed sign", help="the row every other is paired with")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    common.set_threads(args.threads)
    print(common.machine_line())
    labels = [label.strip() for label in args.rows.split(",")]
    unknown = [label for label in labels if label not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    for dataset in args.datasets.split(","):
        if dataset == "synthetic":
            common.ensure_synthetic()
            recipe, overrides = "synthetic", []
        else:
            import realmedia

            _, overrides = realmedia.ensure_dataset(dataset)
            recipe = realmedia.RECIPE
        results = {}
        for label in labels:
            config = load_config(recipe, overrides + ROWS[label])
            results[label] = _per_seed(config, args.seeds, f"controls-{label.replace(' ', '-').lower()}")
            accuracy, alpha, seconds = results[label]
            print(f"  {dataset} {label}: {np.mean(list(accuracy.values())):.4f} ({seconds:.0f} s)", flush=True)
        reference = results.get(args.reference, (None,))[0]
        rows, p_values = [], []
        for label in labels:
            accuracy, alpha, seconds = results[label]
            values = np.array(list(accuracy.values()))
            final_alpha = (
                f"{np.mean(list(alpha.values())):.3f}±{np.std(list(alpha.values()), ddof=1):.3f}" if alpha else "-"
            )
            row = [label, f"{values.mean():.4f}±{values.std(ddof=1):.4f}", final_alpha, f"{seconds / args.seeds:.1f}"]
            if reference is not None and label != args.reference:
                seeds = sorted(set(accuracy) & set(reference))
                difference = np.array([accuracy[s] - reference[s] for s in seeds])
                mean, error = difference.mean(), difference.std(ddof=1) / np.sqrt(len(seeds))
                half = stats.t.ppf(0.975, len(seeds) - 1) * error
                t_p = float(stats.ttest_rel([accuracy[s] for s in seeds], [reference[s] for s in seeds]).pvalue)
                w_p = float(stats.wilcoxon(difference).pvalue) if np.any(difference != 0) else 1.0
                p_values.append(t_p)
                row += [f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]", f"{t_p:.3f}", f"{w_p:.3f}"]
            else:
                row += ["reference", "-", "-"]
            rows.append(row)
        adjusted = iter(_holm(p_values))
        for row in rows:
            row.append(f"{next(adjusted):.3f}" if row[4] != "reference" else "-")
        common.print_table(
            ["row", "test ACC", "final alpha", "s/run", "paired diff. [95% CI]", "t-test p", "Wilcoxon p", "Holm p"],
            rows,
            title=f"{dataset}: {args.seeds} seeds, paired with '{args.reference}' (t-test p Holm-corrected)",
        )


if __name__ == "__main__":
    main()
