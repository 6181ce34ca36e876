"""Modality imbalance on the built-in synthetic data: does the paper's method beat plain Concat and shrink the gap?

Prints, over N seeds (default 3): multimodal test ACC, per-modality test ACC and their gap for constant 0 (plain
Concat), constant 0.5, stepwise h(0.05), heuristic (Ours-H) and lb (Ours-LB), plus each modality trained alone
(`--method unimodal`). Test scores are taken at the epoch chosen on validation.

    python bench/imbalance.py                 # 3 seeds, the synthetic recipe's settings
    python bench/imbalance.py --seeds 5 --set train.epochs=30
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

ROWS = [
    ("constant 0 (Concat)", ["strategy.name=constant", "strategy.alpha=0.0"]),
    ("constant 0.5", ["strategy.name=constant", "strategy.alpha=0.5"]),
    ("stepwise h(0.05)", ["strategy.name=stepwise", "strategy.p=0.05"]),
    ("heuristic (Ours-H)", ["strategy.name=heuristic"]),
    ("lb (Ours-LB)", ["strategy.name=lb"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--only", help="run only rows whose label contains this text")
    args = parser.parse_args()

    home, dataset_modalities = common.kept_registry_with_synthetic()
    from dmgl_cli.methods import METHODS

    rows = list(ROWS)
    if "unimodal" in METHODS:
        rows += [
            (
                f"{m} alone",
                [
                    "method.name=unimodal",
                    f"method.options.unimodal.modality={m}",
                    "strategy.name=constant",
                    "strategy.alpha=0.0",
                ],
            )
            for m in dataset_modalities
        ]
    else:
        print("note: --method unimodal is not available; the 'modality alone' rows are skipped", file=sys.stderr)
    if args.only:
        rows = [r for r in rows if args.only in r[0]]

    print(f"registry {home}; {args.seeds} seeds; overrides {args.overrides or 'none'}")
    common.accuracy_table("synthetic", rows, args.overrides, args.seeds, dataset_modalities, "bench")


if __name__ == "__main__":
    main()
