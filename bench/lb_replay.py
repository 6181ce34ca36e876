"""Does Ours-LB's hypergradient say what alpha actually does? The replay test, and the curvature of real networks.

Sections (``--sections``):

1. ``replay``: along real training runs (the real ``Trainer``), each epoch is replayed from a snapshot taken before
   it (model, optimiser, alpha, RNG: the replay reproduces the real epoch exactly) with alpha moved by +-eps, and the
   classification loss on the whole held-out outer set after the epoch gives the epoch-level effect
   ``D_e = d L_outer / d alpha`` by central differences. Each estimator (``strategy.lb.estimator`` epoch, average,
   and v0.2's step) is computed on the same epoch by another replay, so every estimator sees the same weights.
   Printed per estimator: sign agreement and correlation with the effect on *the epoch it measured* (D_e) and on *the
   epoch its update governs* (D_e+1, the decision it drives), against the rule "always lower alpha" (D > 0), and the
   mean signal-to-noise ratio the estimator reports. Datasets: ``synthetic`` and ``digits-av`` (bench/realmedia.py).
2. ``smoothness``: is the effect of alpha on an epoch smooth at the scale of a derivative? Central differences at
   eps 0.05 .. 1e-4 beside forward mode's exact derivative, at points along a synthetic run.
3. ``curvature``: CREMA-D-shaped ResNet18 trunks (width 4, batch 32, weight decay 1e-4) at snapshots along
   training: conjugate gradient on the Hessian (``approx=cg``) and on the damped generalised Gauss-Newton matrix
   (``approx=ggn``): products used, relative residual, negative curvature met, and whether the solve was flagged
   (fallback to identity).

    python bench/lb_replay.py                                     # both sections, ~15 minutes on 2 CPU cores
    python bench/lb_replay.py --sections replay --datasets synthetic --seeds 3

Figures and what they decided: bench/README.md ("lb_replay.py").
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ESTIMATORS = {
    "forward (with H Z)": ["strategy.lb.estimator=forward"],
    "epoch (first order)": ["strategy.lb.estimator=epoch"],
    "average of look-aheads": ["strategy.lb.estimator=average"],
    "step (v0.2 default)": ["strategy.lb.estimator=step", "strategy.lb.approx=identity"],
}


def _dataset_overrides(name: str) -> tuple[str, list[str]]:
    if name == "synthetic":
        common.ensure_synthetic()
        return "synthetic", []
    import realmedia

    dataset, overrides = realmedia.ensure_dataset(name)
    return realmedia.RECIPE, overrides


def outer_loss(trainer) -> float:
    """The classification loss over the whole outer set, in eval mode (what the hypergradient differentiates)."""
    from dmgl_cli.device import to_device

    outer = trainer.outer_step
    split = outer.outer_split()
    size = trainer.config.train.eval_batch_size
    total, model = 0.0, trainer.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(split), size):
            positions = list(range(start, min(start + size, len(split))))
            inputs, labels = to_device(split.__getitems__(positions), trainer.device)
            output = trainer.method.forward(model, inputs, training=False)
            total += float(trainer.method.classification_loss(output, labels)) * len(positions)
    model.train(was_training)
    return total / len(split)


def replay_epoch(trainer, snapshot, epoch: int, epochs: int, alpha: float | None = None):
    """Train epoch ``epoch`` again from ``snapshot`` (optionally at another alpha); the trainer after it."""
    trainer.load_state_dict(copy.deepcopy(snapshot), "replay")
    trainer.strategy.start_epoch(epoch, epochs)
    if alpha is not None:
        trainer.strategy._alpha = alpha
    trainer._train_epoch()
    return trainer


def _agreement(estimates: list[float], effects: list[float]) -> tuple[float, float]:
    signs = [math.copysign(1, a) == math.copysign(1, b) for a, b in zip(estimates, effects, strict=True)]
    correlation = float(np.corrcoef(estimates, effects)[0, 1]) if len(estimates) > 2 else float("nan")
    return 100.0 * float(np.mean(signs)), correlation


def _adam_directions(values: list[float], per_seed: int) -> list[float]:
    """The first moment of Adam on alpha (beta1 0.9) after each hypergradient, restarted per seed: its sign is the
    direction alpha steps (lowered when positive)."""
    moments, moment = [], 0.0
    for index, value in enumerate(values):
        moment = value * 0.1 if index % per_seed == 0 else 0.9 * moment + 0.1 * value
        moments.append(moment)
    return moments


def replay_section(datasets: list[str], seeds: int, epochs: int | None, eps: float, driver: str) -> None:
    from dmgl_cli.config import load_config
    from dmgl_cli.train import Trainer

    for name in datasets:
        recipe, overrides = _dataset_overrides(name)
        base = [*overrides, "strategy.name=lb"] + ([f"train.epochs={epochs}"] if epochs else [])
        dataset = common.open_dataset(load_config(recipe, base).dataset)
        values: dict[str, list[float]] = {k: [] for k in ESTIMATORS}
        snrs: dict[str, list[float]] = {k: [] for k in ESTIMATORS}
        same_epoch: list[float] = []  # D_e of the epoch each estimate measured
        next_epoch: list[float | None] = []  # D_e+1, the epoch its update governs (None after the last)
        exact: list[float] = []  # driver's hypergradient minus the same estimator's replay (0: replays are exact)
        started = time.perf_counter()
        total_per_seed = load_config(recipe, base).train.epochs
        for seed in range(seeds):
            config = load_config(recipe, base + ESTIMATORS[driver])
            total = config.train.epochs
            runner = common.EpochRunner(config, seed=seed, dataset=dataset)
            replays = {
                label: Trainer(load_config(recipe, base + settings), dataset, seed, common.MemorySink())
                for label, settings in ESTIMATORS.items()
            }
            effects = []
            for epoch in range(total):
                snapshot = copy.deepcopy(runner.trainer.state_dict())
                alpha = runner.trainer.strategy.alpha
                for label, trainer in replays.items():
                    replay_epoch(trainer, snapshot, epoch, total)
                    values[label].append(float(trainer.strategy.last_hypergradient))
                    snr = trainer.outer_step.records[-1].snr if trainer.outer_step.records else None
                    if snr is not None and math.isfinite(snr):
                        snrs[label].append(snr)
                probe = replays["step (v0.2 default)"]
                up = outer_loss(replay_epoch(probe, snapshot, epoch, total, min(alpha + eps, 1.0)))
                down = outer_loss(replay_epoch(probe, snapshot, epoch, total, max(alpha - eps, 0.0)))
                effects.append((up - down) / (min(alpha + eps, 1.0) - max(alpha - eps, 0.0)))
                metrics = runner.epoch()
                exact.append(metrics["alpha_hypergradient"] - values[driver][-1])
            same_epoch.extend(effects)
            next_epoch.extend([*effects[1:], None])
            print(f"  {name} seed {seed}: {total} epochs replayed, {time.perf_counter() - started:.0f} s", flush=True)
        lower = 100.0 * float(np.mean([d > 0 for d in same_epoch]))
        nexts = [d for d in next_epoch if d is not None]
        lower_next = 100.0 * float(np.mean([d > 0 for d in nexts]))
        rows = []
        for label in ESTIMATORS:
            sign_same, corr_same = _agreement(values[label], same_epoch)
            paired = [(v, d) for v, d in zip(values[label], next_epoch, strict=True) if d is not None]
            sign_next, corr_next = _agreement([v for v, _ in paired], [d for _, d in paired])
            snr = f"{np.mean(snrs[label]):.2f}" if snrs[label] else "-"
            rows.append(
                [label, f"{sign_same:.0f}%", f"{corr_same:+.2f}", f"{sign_next:.0f}%", f"{corr_next:+.2f}", snr]
            )
        rows.append(['"always lower alpha"', f"{lower:.0f}%", "-", f"{lower_next:.0f}%", "-", "-"])
        # the best any hindsight estimate can do for the next epoch: the measured effect of the epoch before it
        paired = [(d, n) for d, n in zip(same_epoch, next_epoch, strict=True) if n is not None]
        sign_oracle, corr_oracle = _agreement([d for d, _ in paired], [n for _, n in paired])
        rows.append(["oracle: D_e itself", "100%", "+1.00", f"{sign_oracle:.0f}%", f"{corr_oracle:+.2f}", "-"])
        for label in ESTIMATORS:  # where Adam on alpha actually steps: the sign of its first moment
            moments = _adam_directions(values[label], total_per_seed)
            paired = [(m, d) for m, d in zip(moments, next_epoch, strict=True) if d is not None]
            sign_step, _ = _agreement([m for m, _ in paired], [d for _, d in paired])
            rows.append([f"  Adam step of {label.split(' (')[0]}", "-", "-", f"{sign_step:.0f}%", "-", "-"])
        common.print_table(
            ["estimator", "sign = D_e", "corr D_e", "sign = D_e+1", "corr D_e+1", "mean SNR"],
            rows,
            title=(
                f"{name}: {len(same_epoch)} epochs ({seeds} seeds), eps {eps}, driver {driver}; replay exactness: "
                f"max |driver - replay| {max(abs(x) for x in exact):.1e}"
            ),
        )


def smoothness_section(points: int) -> None:
    """Is alpha's effect on one epoch smooth? The central difference at several step sizes, at points along a
    synthetic run, beside forward mode's exact derivative: where they disagree with each other, training amplifies
    a tiny change of alpha and no derivative describes a finite one."""
    from dmgl_cli.config import load_config
    from dmgl_cli.train import Trainer

    common.ensure_synthetic()
    config = load_config(
        "synthetic", ["strategy.name=lb", "strategy.lb.estimator=forward", "strategy.lb.mixed_every=1"]
    )
    dataset = common.open_dataset("synthetic")
    runner = common.EpochRunner(config, seed=0, dataset=dataset)
    probe = Trainer(config, dataset, 0, common.MemorySink())
    total = config.train.epochs
    rows = []
    for epoch in range(total):
        snapshot = copy.deepcopy(runner.trainer.state_dict())
        alpha = runner.trainer.strategy.alpha
        metrics = runner.epoch()
        if epoch % max(1, total // points) != 0:
            continue
        cells = [f"epoch {epoch + 1}", f"{metrics['alpha_hypergradient']:+.4f}"]
        for eps in (0.05, 1e-2, 1e-3, 1e-4):
            low, high = max(alpha - eps, 0.0), min(alpha + eps, 1.0)
            up = outer_loss(replay_epoch(probe, snapshot, epoch, total, high))
            down = outer_loss(replay_epoch(probe, snapshot, epoch, total, low))
            cells.append(f"{(up - down) / (high - low):+.4f}")
        rows.append(cells)
    common.print_table(
        ["point", "forward (exact derivative)", "eps 0.05", "eps 1e-2", "eps 1e-3", "eps 1e-4"],
        rows,
        title="synthetic, seed 0: d L_outer / d alpha over one epoch, replayed at alpha +- eps",
    )


def curvature_section(snapshots: int, terms: int) -> None:
    """CG on H against CG on the damped GGN, on CREMA-D-shaped ResNet18 trunks along training."""
    from dmgl_cli.config import load_config
    from dmgl_cli.device import to_device
    from dmgl_cli.hypergradient import coupled_weight_decay, ggn_hypergradient, implicit_hypergradient, mixed_gradient
    from dmgl_cli.objective import compute_losses
    from dmgl_cli.strategies.estimators import convex_outputs

    name = common.write_crema_shaped("crema-curvature", 256, 64, frames=1, frame_size=32)
    overrides = common.crema_overrides(name, "resnet18", 4, 32, sampled_frames=1)
    config = load_config("crema-d", [*overrides, "optim.weight_decay=1e-4", "train.epochs=1", "strategy.name=lb"])
    runner = common.EpochRunner(config, seed=0)
    trainer = runner.trainer
    rows = []
    for snapshot in range(snapshots):
        if snapshot:
            runner.epoch()
        batch = next(iter(trainer.train_loader))
        inputs, labels = to_device(batch, trainer.device)
        outer = trainer.outer_step
        params = outer.hyper_parameters()
        decay = coupled_weight_decay(trainer.optimizer, params)
        lr = float(trainer.optimizer.param_groups[0]["lr"])
        for approx in ("cg", "ggn"):
            trainer.model.train()
            output = trainer.method.forward(trainer.model, inputs, training=True)
            cls_loss, mm_loss = compute_losses(trainer.method, trainer.config, output, labels)
            outer_output, outer_labels = outer.outer_output()
            outer_cls = trainer.method.classification_loss(outer_output, outer_labels)
            if approx == "cg":
                result = implicit_hypergradient(
                    cls_loss,
                    mm_loss,
                    0.5,
                    outer_cls,
                    params,
                    "cg",
                    terms,
                    None,
                    0.0,
                    weight_decay=decay,
                    outer_shares_graph=False,
                    tolerance=1e-2,
                    max_residual=0.5,
                    fallback_scale=lr,
                )
            else:
                mixed = mixed_gradient(cls_loss, mm_loss, params)
                outputs, loss = convex_outputs(output, labels, 0.5, trainer.config.loss.tau)
                result = ggn_hypergradient(
                    outputs,
                    loss,
                    mixed,
                    outer_cls,
                    params,
                    terms,
                    0.0,
                    1e-2,
                    weight_decay=decay,
                    tolerance=1e-2,
                    max_residual=0.5,
                    fallback_scale=lr,
                )
            rows.append(
                [
                    f"after {snapshot} epochs",
                    approx,
                    result.hessian_products,
                    f"{result.relative_residual:.2e}",
                    "yes" if result.negative_curvature else "no",
                    "yes" if result.fallback else "no",
                    f"{result.value:+.3e}",
                ]
            )
    common.print_table(
        ["snapshot", "approx", "products", "rel. residual", "neg. curvature", "flagged (fallback)", "value"],
        rows,
        title=f"CG on H and on the GGN (relative damping 1e-2, tolerance 1e-2, at most {terms} iterations)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="replay,smoothness,curvature")
    parser.add_argument("--datasets", default="synthetic,digits-av")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the recipe's)")
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--driver", default="epoch (first order)", choices=list(ESTIMATORS))
    parser.add_argument("--snapshots", type=int, default=5)
    parser.add_argument("--points", type=int, default=5, help="smoothness: points along the run")
    parser.add_argument("--terms", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    common.use_private_registry()
    common.set_threads(args.threads)
    print(common.machine_line())
    sections = args.sections.split(",")
    if "replay" in sections:
        replay_section(args.datasets.split(","), args.seeds, args.epochs, args.eps, args.driver)
    if "smoothness" in sections:
        smoothness_section(args.points)
    if "curvature" in sections:
        curvature_section(args.snapshots, args.terms)


if __name__ == "__main__":
    main()
