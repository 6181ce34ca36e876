"""Table 1 on the built-in synthetic data: every registered method, the uni-modal rows, Ours-H and Ours-LB.

Trains each row over N seeds (default 3) through ``dmgl_cli.run.training.train`` — the same loop, data, encoders and
seeds for every row — and prints multimodal test ACC, per-modality test ACC and their gap (mean ± std over seeds,
test scores at the epoch chosen on validation), then the ``dmgl report --table main`` table of the same runs.

Rows are read from the method registry at run time, so a method added later is benchmarked without editing this
file: ``concat`` gives Concat (``--strategy constant --alpha 0``), Ours-H (``heuristic``) and Ours-LB (``lb``);
``unimodal`` one row per modality; ``dmgl-official`` runs with ``lb`` (the only strategy it takes); every other
method runs as published, without the matching loss (``constant``, alpha 0), or with the first strategy it allows.

    python bench/baselines.py                       # 3 seeds, the synthetic recipe (20 epochs)
    python bench/baselines.py --epochs 10 --only ogm,pmr  # rows whose label contains "ogm" or "pmr"
    DMGL_HOME=/tmp/bench python bench/baselines.py  # keep the runs (default: a temporary registry)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

EXPERIMENT = "bench-baselines"


def rows_for(methods: dict, modalities: list[str]) -> list[tuple[str, list[str]]]:
    """(label, config overrides) for every row of the table, from the method registry."""
    constant = ["strategy.name=constant", "strategy.alpha=0.0"]
    rows: list[tuple[str, list[str]]] = []
    for name, method in methods.items():
        base = [f"method.name={name}"]
        if name == "concat":
            rows += [
                ("concat", base + constant),
                ("Ours-H", base + ["strategy.name=heuristic"]),
                ("Ours-LB", base + ["strategy.name=lb"]),
            ]
        elif name == "unimodal":
            rows += [
                (f"unimodal ({m})", base + constant + [f"method.options.unimodal.modality={m}"]) for m in modalities
            ]
        elif method.strategies is not None and "constant" not in method.strategies:
            rows.append((name, base + [f"strategy.name={method.strategies[0]}"]))
        else:
            rows.append((name, base + constant))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="override the recipe's train.epochs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--only", help="run only rows whose label contains one of these comma-separated texts")
    args = parser.parse_args()

    home, modalities = common.kept_registry_with_synthetic()
    from dmgl_cli.config import load_config
    from dmgl_cli.methods import METHODS

    overrides = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    overrides.append(f"experiment={EXPERIMENT}")
    rows = rows_for(METHODS, modalities)
    if args.only:
        wanted = [text for text in args.only.split(",") if text]
        rows = [r for r in rows if any(text in r[0] for text in wanted)]

    print(f"registry {home}; {args.seeds} seeds; overrides {overrides}", flush=True)
    header = f"{'method':<18} {'multimodal ACC':>16} " + " ".join(f"{m + ' ACC':>16}" for m in modalities)
    header += f" {'gap':>16} {'seconds':>8}"
    lines = [header, "-" * len(header)]
    print(header, flush=True)
    for label, settings in rows:
        config = load_config("synthetic", settings + overrides)
        run_name = "bench-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in label).strip("-")
        summary, seconds = common.train_seeds(config, args.seeds, run_name)
        line = f"{common.accuracy_line(label, summary, modalities, width=18)} {seconds:>8.1f}"
        lines.append(line)
        print(line, flush=True)

    print("\n" + "\n".join(lines))
    from dmgl_cli.report import Selection, make_report
    from dmgl_cli.tracking import Tracker

    print(f"\n`dmgl report --table main --experiment {EXPERIMENT}`:")
    print(make_report(Selection(experiments=[EXPERIMENT]), tracker=Tracker(), table="main").text)


if __name__ == "__main__":
    main()
