"""How faithful is Ours-LB's hypergradient, what does it cost, and what does it buy?

Four tables (``--sections`` picks them):

1. ``exact``: each approximation of Eq. 3 against the exact implicit gradient of a problem small enough to invert
   ``H`` (multinomial logistic regression with a matching term and the optimiser's weight decay, 15 parameters),
   at 36 points: at the inner optimum for 9 alphas and perturbed around it.
2. ``unrolled``: each approximation against what alpha really does to the outer loss: at points along a real
   training run, alpha is moved by +-eps, the same next ``h`` batches are trained (same optimiser state), and the
   change of the classification loss on the held-out outer set gives the finite difference. Horizons: 1 step and
   ``update_every`` steps. Cases: the synthetic model and a CREMA-D-shaped ResNet18 (257x299 spectrograms, 3
   frames; width and frame size below).
3. ``cost``: one hypergradient in training steps, and the epoch time of ``lb`` over ``heuristic``'s at the default
   update interval (interleaved, in one process).
4. ``accuracy``: test ACC, per-modality test ACC and gap (mean +- std over seeds, test scores at the epoch chosen on
   validation) and LB's final alpha, for Concat, Ours-H and Ours-LB on the synthetic data and on ``digits-av``, a
   real-media audio-image set (scikit-learn's scanned handwritten digits + espeak-ng's spoken digit names; see
   bench/realmedia.py), on which Concat under-trains one modality.

    python bench/lb_fidelity.py                         # everything, ~13 minutes on 2 CPU cores
    python bench/lb_fidelity.py --sections exact,unrolled --points 10
    python bench/lb_fidelity.py --sections accuracy --seeds 3 --datasets synthetic

Figures and the choice of defaults they led to: bench/README.md.
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
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ------------------------------------------------------------------------------------------ 1. exact problem

FEATURES, CLASSES, WEIGHT_DECAY = 4, 3, 0.03


def _exact_problem():
    generator = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x_inner, x_outer, true_weight = randn(40, FEATURES), randn(30, FEATURES), randn(CLASSES, FEATURES)
    y_inner = (x_inner @ true_weight.T + 0.8 * randn(40, CLASSES)).argmax(1)
    y_outer = (x_outer @ true_weight.T + 0.8 * randn(30, CLASSES)).argmax(1)
    targets = randn(40, CLASSES)  # the matching term pulls the logits towards targets that disagree with the labels

    def losses(theta):
        weight, bias = theta[: CLASSES * FEATURES].reshape(CLASSES, FEATURES), theta[CLASSES * FEATURES :]
        logits = x_inner @ weight.T + bias
        return (
            F.cross_entropy(logits, y_inner),
            0.5 * (logits - targets).pow(2).sum(1).mean(),
            F.cross_entropy(x_outer @ weight.T + bias, y_outer),
        )

    return losses


def _inner_objective(losses, theta, alpha):
    cls, mm, _ = losses(theta)
    return (1 - alpha) * cls + alpha * mm + 0.5 * WEIGHT_DECAY * theta.pow(2).sum()


def _optimum(losses, alpha):
    theta = torch.zeros(CLASSES * FEATURES + CLASSES, dtype=torch.float64)
    for _ in range(40):
        point = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_inner_objective(losses, point, alpha), point)
        if grad.norm() < 1e-13:
            break
        hessian = torch.autograd.functional.hessian(lambda t: _inner_objective(losses, t, alpha), theta)
        theta = theta - torch.linalg.solve(hessian, grad)
    return theta


def _exact_value(losses, theta, alpha):
    point = theta.clone().requires_grad_(True)
    g_cls, g_mm, v = (torch.autograd.grad(loss, point, retain_graph=True)[0] for loss in losses(point))
    hessian = torch.autograd.functional.hessian(lambda t: _inner_objective(losses, t, alpha), theta)
    return float(-(g_mm - g_cls) @ torch.linalg.solve(hessian, v))


EXACT_SETTINGS = [  # label, approx, terms, scale, weight decay in H
    ("identity, scale 0.05 (= synthetic lr)", "identity", 0, 0.05, True),
    ("neumann K=3 scale 0.01 (v0.1 recipes)", "neumann", 3, 0.01, True),
    ("neumann K=20 scale 1/lambda_max", "neumann", 20, None, True),
    ("neumann K=100 scale 1/lambda_max", "neumann", 100, None, True),
    ("cg K=5", "cg", 5, None, True),
    ("cg K=20 (default terms)", "cg", 20, None, True),
    ("cg K=20, weight decay left out of H (v0.1)", "cg", 20, None, False),
]


def exact_table() -> list[list]:
    from dmgl_cli.hypergradient import implicit_hypergradient

    losses = _exact_problem()
    generator = torch.Generator().manual_seed(11)
    points = []
    for alpha in [0.1 * k for k in range(1, 10)]:
        optimum = _optimum(losses, alpha)
        points.append((alpha, optimum))
        for _ in range(3):
            points.append((alpha, optimum + 0.3 * torch.randn(optimum.shape, generator=generator, dtype=torch.float64)))
    exact = [_exact_value(losses, theta, alpha) for alpha, theta in points]
    rows = []
    for label, approx, terms, scale, with_decay in EXACT_SETTINGS:
        values = []
        for alpha, theta in points:
            point = theta.clone().requires_grad_(True)
            cls, mm, outer = losses(point)
            values.append(
                implicit_hypergradient(
                    cls,
                    mm,
                    alpha,
                    outer,
                    [point],
                    approx,
                    terms,
                    scale,
                    0.0,
                    weight_decay=WEIGHT_DECAY if with_decay else 0.0,
                ).value
            )
        errors = [abs(v - e) / abs(e) for v, e in zip(values, exact, strict=True)]
        rows.append(
            [
                label,
                f"{common.median(errors):.1e}",
                f"{max(errors):.1e}",
                _agreement(values, exact),
                _correlation(values, exact),
            ]
        )
    return rows


def _agreement(values: list[float], reference: list[float]) -> str:
    pairs = [(v, r) for v, r in zip(values, reference, strict=True) if r != 0]
    return f"{sum((v > 0) == (r > 0) for v, r in pairs) / max(len(pairs), 1):.0%}"


def _correlation(values: list[float], reference: list[float]) -> float:
    if len(values) < 3:
        return float("nan")
    matrix = torch.tensor([values, reference], dtype=torch.float64)
    return float(torch.corrcoef(matrix)[0, 1])


# -------------------------------------------------------------------------------------- 2. unrolled horizons

UNROLLED_APPROXIMATIONS = [  # label, config overrides, cases (None: all)
    ("identity (scale = lr)", ["strategy.lb.approx=identity", "strategy.lb.scale=auto"], None),
    # ~110 training steps per value on the ResNet (20 power iterations + 10 rounds): the synthetic case only
    (
        "neumann K=20, 1/lambda_max",
        ["strategy.lb.approx=neumann", "strategy.lb.terms=20", "strategy.lb.scale=auto"],
        ("synthetic",),
    ),
    ("cg K=5", ["strategy.lb.approx=cg", "strategy.lb.terms=5"], None),
    ("cg K=20", ["strategy.lb.approx=cg", "strategy.lb.terms=20"], None),
]


def unrolled_case(case: str, args) -> tuple[list[list], dict[str, float]]:
    """(rows, hypergradient seconds per approximation) for one case."""
    from dmgl_cli.device import to_device as _to_device
    from dmgl_cli.train import compute_losses

    recipe, overrides = _case_settings(case, args)
    config = common.load(
        recipe,
        overrides
        + [
            "strategy.name=lb",
            "strategy.lb.outer_sampling=fixed",
            "strategy.lb.outer_batch_size=100000",
            "train.amp=false",
        ],
    )
    runner = common.EpochRunner(config)
    trainer = runner.trainer
    strategy = trainer.strategy
    # the batches of the walk, fixed as tensors (the augmentation is random per batch: fetch once, reuse)
    horizon = max(args.horizons)
    points = args.crema_points if case == "crema-resnet18" else args.points
    needed = args.warmup_steps + points * args.spacing + horizon
    batches = []
    epoch = 0
    while len(batches) < needed:  # as many epochs of the training loader as the walk needs
        trainer.train_loader.batch_sampler.set_epoch(epoch)
        batches += [_to_device(batch, trainer.device) for batch in trainer.train_loader]
        epoch += 1
    batches = batches[:needed]

    def train_step(inputs, labels, alpha):
        output = trainer.method.forward(trainer.model, inputs, training=True)
        cls_loss, mm_loss = compute_losses(trainer.method, trainer.config, output, labels)
        trainer.optimizer.zero_grad(set_to_none=True)
        ((1 - alpha) * cls_loss + alpha * mm_loss).backward()
        trainer.optimizer.step()

    def outer_loss() -> float:
        with torch.no_grad():
            output, labels = trainer._outer_output()
            return float(trainer.method.classification_loss(output, labels))

    alpha = 0.5
    position = 0
    for _ in range(args.warmup_steps):  # away from initialisation, where training actually is
        train_step(*batches[position], alpha)
        position += 1
    approximations = [
        (label, settings) for label, settings, cases in UNROLLED_APPROXIMATIONS if cases is None or case in cases
    ]
    estimates: dict[str, list[float]] = {label: [] for label, _ in approximations}
    seconds: dict[str, list[float]] = {label: [] for label, _ in approximations}
    differences: dict[int, list[float]] = {h: [] for h in args.horizons}
    for _ in range(points):
        model_state = copy.deepcopy(trainer.model.state_dict())
        optimizer_state = copy.deepcopy(trainer.optimizer.state_dict())
        inputs, labels = batches[position]
        for label, settings in approximations:
            approx_config = common.load(recipe, overrides + ["strategy.name=lb"] + settings)
            lb = approx_config.strategy.lb
            strategy.approx, strategy.terms = lb.approx, lb.terms
            strategy.scale = None if lb.scale == "auto" else lb.scale
            strategy.largest_eigenvalue = strategy.eigenvalue_update = None
            strategy._alpha = alpha
            started = time.perf_counter()
            output = trainer.method.forward(trainer.model, inputs, training=True)
            cls_loss, mm_loss = compute_losses(trainer.method, trainer.config, output, labels)
            estimates[label].append(trainer._alpha_hypergradient(cls_loss, mm_loss))
            seconds[label].append(time.perf_counter() - started)
            trainer.model.load_state_dict(model_state)  # the forward's BatchNorm statistics are undone
        for h in args.horizons:
            ends = []
            for sign in (1, -1):
                trainer.model.load_state_dict(model_state)
                trainer.optimizer.load_state_dict(copy.deepcopy(optimizer_state))  # load aliases same-dtype state
                for step in range(h):
                    train_step(*batches[position + step], alpha + sign * args.eps)
                ends.append(outer_loss())
            differences[h].append((ends[0] - ends[1]) / (2 * args.eps))
        trainer.model.load_state_dict(model_state)
        trainer.optimizer.load_state_dict(copy.deepcopy(optimizer_state))  # load aliases same-dtype state
        for _ in range(args.spacing):  # on to the next point along the run
            train_step(*batches[position], alpha)
            position += 1
    rows = []
    for label, _ in approximations:
        row = [case, label]
        for h in args.horizons:
            ratios = [abs(v / d) for v, d in zip(estimates[label], differences[h], strict=True) if d != 0]
            row += [
                _agreement(estimates[label], differences[h]),
                _correlation(estimates[label], differences[h]),
                common.median(ratios),
            ]
        rows.append(row)
    return rows, {label: common.median(values) for label, values in seconds.items()}


def _case_settings(case: str, args) -> tuple[str, list[str]]:
    if case == "synthetic":
        return "synthetic", [f"dataset={common.ensure_synthetic()}", "data.num_workers=0"]
    if case == "crema-resnet18":
        dataset = common.write_crema_shaped("crema-fidelity", 320, 32, frame_size=args.frame_size)
        return "crema-d", common.crema_overrides(dataset, "resnet18", args.width, args.crema_batch_size)
    raise SystemExit(f"unknown case {case!r}; valid: synthetic, crema-resnet18")


# ----------------------------------------------------------------------------------------------------- 3. cost


def cost_rows(case: str, args, hypergradient_seconds: dict[str, float]) -> list[list]:
    """Epoch time of lb (default, and cg K=20 once per epoch) over heuristic's, interleaved; one hypergradient's
    cost in training steps from the unrolled section's timings."""
    recipe, overrides = _case_settings(case, args)
    variants = {
        "heuristic": ["strategy.name=heuristic"],
        "lb default (identity, once per epoch)": ["strategy.name=lb"],
        "lb identity every 20 steps": ["strategy.name=lb", "strategy.lb.update_every=20"],
        "lb cg K=20, every epoch": [
            "strategy.name=lb",
            "strategy.lb.approx=cg",
            "strategy.lb.terms=20",
            "strategy.lb.update_every=epoch",
        ],
    }
    if case == "crema-resnet18":
        overrides = overrides + [f"train.batch_size={args.crema_batch_size}"]
    runners = {name: common.EpochRunner(common.load(recipe, overrides + extra)) for name, extra in variants.items()}
    times = common.interleave(
        {name: (lambda r=r: r.epoch()["epoch_seconds"]) for name, r in runners.items()},
        args.repeats,
        warmup=1,
        progress=False,
    )
    step_seconds = common.median(times["heuristic"]) / len(runners["heuristic"].trainer.train_loader)
    rows = []
    for name in variants:
        ratio = common.median(common.paired_ratios(times[name], times["heuristic"]))
        rows.append([case, name, common.median(times[name]), ratio, len(runners[name].trainer.train_loader)])
    for label, seconds in hypergradient_seconds.items():
        rows.append([case, f"one hypergradient: {label}", seconds, seconds / step_seconds, "(in steps)"])
    return rows


# ------------------------------------------------------------------------------------------------- 4. accuracy

ACCURACY_ROWS = [
    ("Concat", ["strategy.name=constant", "strategy.alpha=0.0"]),
    ("Ours-H", ["strategy.name=heuristic"]),
    ("Ours-LB (default)", ["strategy.name=lb"]),
]


def accuracy_rows(dataset: str, args) -> list[list]:
    from dmgl_cli.config import load_config
    from dmgl_cli.data.registry import open_dataset
    from dmgl_cli.run import training
    from dmgl_cli.tracking import Tracker

    if dataset == "synthetic":
        recipe, overrides = "synthetic", [f"dataset={common.ensure_synthetic()}"]
    else:
        import realmedia

        name, overrides = realmedia.ensure_dataset(dataset)
        recipe, overrides = "custom", [f"dataset={name}", *overrides]
    modalities = list(open_dataset(overrides[0].split("=", 1)[1]).modalities)
    rows = []
    extra_rows = [
        (label, ["strategy.name=lb", *settings.split(",")])
        for label, settings in (item.split("=", 1) for item in args.lb_variant)
    ]
    for label, settings in ([] if args.variants_only else ACCURACY_ROWS) + extra_rows:
        config = load_config(recipe, overrides + settings + args.overrides)
        started = time.perf_counter()
        outcome = training.train(
            config, list(range(args.seeds)), tracker=Tracker(), run_name=f"fidelity-{label.split()[0]}"
        )
        seconds = time.perf_counter() - started
        summary = outcome.summary
        alphas = [_final_alpha(seed.run_id) for seed in outcome.seeds] if settings[0] == "strategy.name=lb" else []
        row = [dataset, label, common.seed_cell(summary, "test_acc").strip()]
        row += [common.seed_cell(summary, f"test_acc_{m}").strip() for m in modalities]
        row += [common.seed_cell(summary, "test_gap_acc").strip(), _alpha_cell(alphas), f"{seconds:.0f}"]
        rows.append(row)
        print("  " + "  ".join(row), file=sys.stderr, flush=True)
    return rows, modalities


def _final_alpha(run_id: str) -> float:
    from dmgl_cli.tracking import Tracker

    return Tracker().metric_history(run_id, "alpha")[-1][1]


def _alpha_cell(alphas: list[float]) -> str:
    if not alphas:
        return "-"
    mean = sum(alphas) / len(alphas)
    std = math.sqrt(sum((a - mean) ** 2 for a in alphas) / max(len(alphas) - 1, 1))
    return f"{mean:.3f}±{std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="exact,unrolled,cost,accuracy")
    parser.add_argument("--cases", default="synthetic,crema-resnet18", help="unrolled/cost cases")
    parser.add_argument("--points", type=int, default=20, help="unrolled: points along the run (synthetic)")
    parser.add_argument("--crema-points", type=int, default=8, help="unrolled: points along the run (ResNet18)")
    parser.add_argument("--spacing", type=int, default=5, help="unrolled: training steps between two points")
    parser.add_argument("--warmup-steps", type=int, default=30, help="unrolled: steps trained before the first point")
    parser.add_argument("--horizons", default="1,20", help="unrolled: steps after which the effect is measured")
    parser.add_argument("--eps", type=float, default=0.05, help="unrolled: alpha is moved by +-eps")
    parser.add_argument("--width", type=int, default=16, help="CREMA-D-shaped ResNet18 width (64 = ResNet18)")
    parser.add_argument("--frame-size", type=int, default=64, help="CREMA-D-shaped stored frame side")
    parser.add_argument("--crema-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="cost: recorded interleaved epochs per variant")
    parser.add_argument("--seeds", type=int, default=3, help="accuracy: seeds per row")
    parser.add_argument("--datasets", default="synthetic,digits-av", help="accuracy: datasets")
    parser.add_argument(
        "--lb-variant",
        action="append",
        default=[],
        help="accuracy: another LB row, LABEL=KEY=VALUE,KEY=VALUE (strategy.lb.approx=cg,...)",
    )
    parser.add_argument("--variants-only", action="store_true", help="accuracy: only the --lb-variant rows")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="accuracy: recipe override")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.horizons = [int(h) for h in args.horizons.split(",")]
    sections = set(args.sections.split(","))

    home, _ = common.kept_registry_with_synthetic()
    common.set_threads(args.threads)
    print(f"lb_fidelity: {common.machine_line()}; registry {home}")
    started = time.perf_counter()
    if "exact" in sections:
        common.print_table(
            ["setting", "median rel. error", "max rel. error", "sign agrees", "correlation"],
            exact_table(),
            f"1. Against the exact implicit gradient (weight decay {WEIGHT_DECAY} in the inner objective, 36 points)",
        )
    seconds_by_case: dict[str, dict[str, float]] = {}
    cases = [c for c in args.cases.split(",") if c]
    if "unrolled" in sections:
        rows = []
        for case in cases:
            case_rows, seconds_by_case[case] = unrolled_case(case, args)
            rows += case_rows
        headers = ["case", "approximation"]
        for h in args.horizons:
            headers += [f"sign h={h}", f"corr h={h}", f"|ratio| h={h}"]
        common.print_table(
            headers,
            rows,
            f"2. Against unrolled finite differences of the outer loss ({args.points} "
            f"points on synthetic, {args.crema_points} on the ResNet18, eps {args.eps})",
        )
    if "cost" in sections:
        rows = []
        for case in cases:
            rows += cost_rows(case, args, seconds_by_case.get(case, {}))
        common.print_table(
            ["case", "variant", "s/epoch (median)", "ratio to heuristic", "steps/epoch"],
            rows,
            f"3. Cost ({common.INTERLEAVE_NOTE}); aim: <= 1.05 identity, <= 1.25 curvature-correct",
        )
    if "accuracy" in sections:
        for dataset in [d for d in args.datasets.split(",") if d]:
            rows, modalities = accuracy_rows(dataset, args)
            common.print_table(
                ["dataset", "row", "test ACC", *[f"{m} ACC" for m in modalities], "gap", "final alpha", "seconds"],
                rows,
                f"4. Accuracy over {args.seeds} seeds (test at the epoch chosen on validation)",
            )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
