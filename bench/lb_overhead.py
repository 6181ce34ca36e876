"""What the learning-based strategy costs: epoch time with ``--strategy lb`` / epoch time with ``--strategy heuristic``.

Target at default settings: <= 1.10. Three tables:

1. Epoch-time ratios (the target): the trainer's own ``epoch_seconds`` (the figure logged to MLflow), for lb at
   its default settings and with each H^-1 approximation, divided by heuristic's, on the built-in synthetic data
   and on CREMA-D-shaped data (257x299 spectrogram + 10 stored frames, 3 sampled, flip/crop augmentation) with a
   tiny ResNet18 (width 16) and the real one (width 64). Variants run interleaved, epoch by epoch.
2. Cost of one hypergradient in training steps (forward + backward + optimiser step of the same batch), per
   approximation, number of terms and outer batch size, and the epoch ratio it implies for several
   ``update_every``: ratio ~ 1 + cost / update_every. This is how the defaults were chosen.
3. Peak memory of one training step that computes a hypergradient / that of a plain step, per approximation, each
   in its own process (target <= 1.2 at the default, identity).
4. Accuracy on the foundation's exact-gradient problem (tests/test_hypergradient.py: a 15-parameter problem whose
   Hessian is inverted exactly): each approximation against the exact implicit gradient at 36 points (9 alphas x
   4 parameter vectors), as sign agreement, correlation and median ratio. Alpha moves by ``alpha_lr * value``, so
   the scale is absorbed by ``alpha_lr``; the sign and the ordering are what matter.

    python bench/lb_overhead.py                       # a few minutes on 2 CPU cores
    python bench/lb_overhead.py --cases synthetic     # one case
    python bench/lb_overhead.py --frame-size 224 --batch-size 64 --repeats 5   # the real frame size (slow on CPU)
    python bench/lb_overhead.py --device cuda         # on a GPU (bench/gpu.sh runs the GPU version)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

APPROX_VARIANTS = {
    "lb default": [],
    "lb identity": ["strategy.lb.approx=identity"],
    "lb neumann K=3": ["strategy.lb.approx=neumann", "strategy.lb.terms=3"],
    "lb cg K=3": ["strategy.lb.approx=cg", "strategy.lb.terms=3"],
}


def case_settings(case: str, args) -> tuple[str, list[str], str]:
    """(recipe, overrides, description) of one benchmark case."""
    if case == "synthetic":
        dataset = common.ensure_synthetic()
        return "synthetic", [f"dataset={dataset}", f"train.device={args.device}"], "synthetic (MLP x 2, batch 64)"
    width = {"crema-tiny": common.TINY_WIDTH, "crema-resnet18": 64}[case]
    batch = args.batch_size or (16 if case == "crema-tiny" else 4)
    steps = args.steps_per_epoch
    # enough training samples for `steps` batches after the 10% validation carve-out
    train = math.ceil(steps * batch / 0.9) + 2
    dataset = common.write_crema_shaped(
        f"crema-shaped-{args.frame_size}-{train}", train, max(batch, 16), frame_size=args.frame_size
    )
    overrides = common.crema_overrides(dataset, "resnet18", width, batch) + [f"train.device={args.device}"]
    description = (
        f"CREMA-D-shaped, ResNet18 width {width} x 2, frames {args.frame_size}px, batch {batch}, {steps} steps/epoch"
    )
    return "crema-d", overrides, description


def epoch_ratios(case: str, args) -> list[list]:
    recipe, overrides, description = case_settings(case, args)
    print(f"\n== {case}: {description}", flush=True)
    variants = {"heuristic": ["strategy.name=heuristic"]}
    variants.update({name: ["strategy.name=lb", *extra] for name, extra in APPROX_VARIANTS.items()})
    if case == "crema-resnet18" and not args.all_variants:
        variants = {k: v for k, v in variants.items() if k in ("heuristic", "lb default", "lb identity")}
    for text in args.variant:  # NAME=KEY=VALUE,KEY=VALUE: more lb settings to compare
        name, _, settings = text.partition("=")
        variants[name] = ["strategy.name=lb", *[item for item in settings.split(",") if item]]
    runners = {name: common.EpochRunner(common.load(recipe, overrides + extra)) for name, extra in variants.items()}
    default_lb = runners["lb default"].config.strategy.lb
    epochs = args.epochs_per_call if case == "synthetic" else 1

    def run(name: str):
        def call() -> float:
            return sum(runners[name].epoch()["epoch_seconds"] for _ in range(epochs))

        return call

    # synthetic epochs take tens of milliseconds: more rounds to average the noise out
    repeats = args.repeats * 4 if case == "synthetic" else args.repeats
    times = common.interleave({name: run(name) for name in runners}, repeats, warmup=1)
    rows = []
    for name in runners:
        # Two estimates: the median of the per-round ratios (neighbours in time), and best / best (interference
        # from other processes only ever adds time, so the fastest epoch of each variant is its least disturbed)
        per_round = common.paired_ratios(times[name], times["heuristic"])
        ratio, best = common.median(per_round), min(times[name]) / min(times["heuristic"])
        target = "<= 1.10 " + common.verdict(ratio, 1.10, True) if name == "lb default" else ""
        samples_per_s = runners[name].samples_per_epoch * epochs / min(times[name])
        rows.append(
            [case, name, min(times[name]) / epochs, samples_per_s, ratio, common.spread(per_round), best, target]
        )
    print(
        f"   lb default here: approx {default_lb.approx}, terms {default_lb.terms}, update_every "
        f"{default_lb.update_every}, outer batch {default_lb.outer_batch_size or 'train batch'}"
    )
    return rows


def hypergradient_costs(case: str, args) -> list[list]:
    """Seconds of one hypergradient / seconds of one training step, measured interleaved on one batch."""
    from dmgl_cli.device import to_device as _to_device

    recipe, overrides, _ = case_settings(case, args)
    runner = common.EpochRunner(common.load(recipe, overrides + ["strategy.name=lb"]))
    trainer, method, config = runner.trainer, runner.trainer.method, runner.config
    batch = next(iter(trainer.train_loader))
    inputs, labels = _to_device(batch, trainer.device)
    sync = trainer.device.type == "cuda"
    settings = [
        ("identity", 0, None),
        ("neumann", 1, None),
        ("neumann", 3, None),
        ("neumann", 5, None),
        ("cg", 3, None),
        ("identity", 0, max(8, config.train.batch_size // 2)),
        ("neumann", 3, max(8, config.train.batch_size // 2)),
    ]

    def step(hyper: tuple | None) -> None:
        if hyper is not None:  # every lb setting lives on the strategy object the trainer reads
            trainer.learner.approx, trainer.learner.terms, trainer.learner.outer_batch_size = hyper
        training_step(trainer, method, config, inputs, labels, hyper is not None)

    # sub-millisecond steps (synthetic) are timed in loops of `loops` calls, so one figure spans >= ~0.2 s
    step(None)
    loops = max(1, min(200, round(0.2 / max(common.timed(lambda: step(None), sync), 1e-6))))

    def repeated(setting: tuple | None) -> float:
        return common.timed(lambda: [step(setting) for _ in range(loops)], sync) / loops

    calls = {"step": lambda: repeated(None)}
    for setting in settings:
        calls[_setting_name(setting)] = lambda s=setting: repeated(s)
    times = common.interleave(calls, args.repeats + 2, warmup=1, progress=False)
    rows = []
    for setting in settings:
        name = _setting_name(setting)
        # the hypergradient alone: (step with hypergradient) - (step), as a multiple of a step
        costs = [(with_hyper - plain) / plain for with_hyper, plain in zip(times[name], times["step"], strict=True)]
        cost = max(common.median(costs), 0.0)
        rows.append([case, name, cost, *(1 + cost / every for every in (1, 10, 25, 50))])
    return rows


def training_step(trainer, method, config, inputs, labels, hypergradient: bool | str) -> None:
    """One optimiser step as the trainer takes it, with the hypergradient where the trainer computes it: ``identity``
    after the backward (its outer forward never coexists with the inner graph), ``neumann`` / ``cg`` before."""
    from dmgl_cli.device import autocast as _autocast
    from dmgl_cli.hypergradient import implicit_hypergradient, mixed_gradient
    from dmgl_cli.losses import total_loss
    from dmgl_cli.train import compute_losses

    with _autocast(trainer.device, config.train.amp):
        output = method.forward(trainer.model, inputs, training=True)
    cls_loss, mm_loss = compute_losses(method, config, output, labels)
    mixed = None
    if hypergradient == "identity before the backward":  # v0.1's order: both graphs alive at once
        output_outer, outer_labels = trainer._outer_output()
        outer = method.classification_loss(output_outer, outer_labels)
        lr = trainer.optimizer.param_groups[0]["lr"]
        params = trainer._hyper_parameters()
        implicit_hypergradient(cls_loss, mm_loss, 0.5, outer, params, "identity", 0, lr, 0.0)
        del output_outer, outer
    elif hypergradient and trainer.learner.approx == "identity":
        mixed = mixed_gradient(cls_loss, mm_loss, trainer._hyper_parameters())
    elif hypergradient:
        trainer._alpha_hypergradient(cls_loss, mm_loss)
    trainer.optimizer.zero_grad(set_to_none=True)
    total_loss(0.5, cls_loss, mm_loss).backward()
    del output, cls_loss, mm_loss
    if mixed is not None:
        trainer._identity_hypergradient(mixed)
    trainer.optimizer.step()


MEMORY_VARIANTS = {
    "plain step (heuristic)": None,
    "lb identity (default)": ("identity", 0),
    "lb identity, outer forward before the backward (v0.1)": ("identity", -1),
    "lb neumann K=3": ("neumann", 3),
    "lb cg K=3": ("cg", 3),
}


def _read_status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child(case: str, variant: str, args) -> None:
    """In a fresh process (so one variant's allocations never lower or raise another's peak): build the trainer,
    take one warm-up step (optimiser state, allocator pools), reset the peak resident set (``/proc/self/clear_refs``),
    take the measured step and print its peak RSS, as JSON."""
    import json

    import torch

    from dmgl_cli.device import to_device as _to_device

    recipe, overrides, _ = case_settings(case, args)
    hyper = MEMORY_VARIANTS[variant]
    runner = common.EpochRunner(common.load(recipe, overrides + ["strategy.name=lb"]))
    trainer, method, config = runner.trainer, runner.trainer.method, runner.config
    hypergradient: bool | str = hyper is not None
    if hyper is not None:
        trainer.learner.approx, trainer.learner.terms = hyper[0], max(hyper[1], 0)
        if hyper[1] < 0:
            hypergradient = "identity before the backward"
    inputs, labels = _to_device(next(iter(trainer.train_loader)), trainer.device)
    cuda = trainer.device.type == "cuda"
    training_step(trainer, method, config, inputs, labels, hypergradient)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS
    before = _read_status("VmRSS")
    training_step(trainer, method, config, inputs, labels, hypergradient)
    result = {"before": before, "peak": _read_status("VmHWM")}
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    print("MEMORY " + json.dumps(result), flush=True)


def memory_peaks(case: str, args) -> list[list]:
    """Peak memory of one training step with each approximation's hypergradient / that of a plain step; each
    variant in its own process, glibc told to return large blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``)
    so that the resident set follows what is live."""
    import json
    import os
    import subprocess

    case_settings(case, args)  # writes the dataset once, before the children read it
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    base = [sys.executable, __file__, "--threads", str(args.threads), "--frame-size", str(args.frame_size)]
    base += ["--steps-per-epoch", str(args.steps_per_epoch), "--device", args.device]
    if args.batch_size:
        base += ["--batch-size", str(args.batch_size)]
    measured = {}
    for variant in MEMORY_VARIANTS:
        output = subprocess.run(
            [*base, "--memory-child", f"{case}:{variant}"], env=env, capture_output=True, text=True, check=True
        ).stdout
        measured[variant] = json.loads(output.split("MEMORY ", 1)[1])
    plain = measured["plain step (heuristic)"]
    rows = []
    for variant, figures in measured.items():
        extra, plain_extra = figures["peak"] - figures["before"], plain["peak"] - plain["before"]
        row = [case, variant, common.gigabytes(figures["peak"]), common.gigabytes(extra)]
        row += [figures["peak"] / plain["peak"], extra / max(plain_extra, 1)]
        if "cuda_peak" in figures:
            row.append(figures["cuda_peak"] / plain["cuda_peak"])
        target = "" if MEMORY_VARIANTS[variant] != ("identity", 0) else "<= 1.2 " + common.verdict(row[4], 1.2, True)
        rows.append([*row, target])
    return rows


def _setting_name(setting: tuple) -> str:
    approx, terms, outer = setting
    text = approx if approx == "identity" else f"{approx} K={terms}"
    return text + (f", outer batch {outer}" if outer else "")


def foundation_accuracy() -> list[list]:
    """Each approximation against the exact implicit gradient of tests/test_hypergradient.py's problem."""
    import torch

    sys.path.insert(0, str(common.ROOT / "tests"))
    import test_hypergradient as foundation

    from dmgl_cli.config import LearningBasedConfig
    from dmgl_cli.hypergradient import alpha_hypergradient

    default = LearningBasedConfig()
    # scale auto is the optimiser's learning rate for identity; this problem has none, so the synthetic recipe's
    default_scale = 0.05 if default.scale == "auto" else default.scale
    settings = [
        (
            f"default ({default.approx}{'' if default.approx == 'identity' else f' K={default.terms}'} scale "
            f"{default.scale} = {default_scale})",
            default.approx,
            default.terms,
            default_scale,
        ),
        ("identity scale 0.01", "identity", 0, 0.01),
        ("neumann K=3 scale 0.01", "neumann", 3, 0.01),
        ("neumann K=10 scale 0.9/lambda_max", "neumann", 10, None),
        ("cg K=3", "cg", 3, 1.0),
        ("cg K=15 (= dimension)", "cg", 15, 1.0),
    ]
    generator = torch.Generator().manual_seed(11)
    points = []
    for alpha in [0.1 * k for k in range(1, 10)]:
        optimum = foundation._inner_optimum(alpha)
        points.append((alpha, optimum))
        for _ in range(3):  # away from the optimum too, where training actually is
            points.append((alpha, optimum + 0.3 * torch.randn(optimum.shape, generator=generator, dtype=optimum.dtype)))
    exact = [_exact(foundation, theta, alpha) for alpha, theta in points]
    rows = []
    for label, approx, terms, scale in settings:
        values = []
        for alpha, theta in points:
            step_scale = scale
            if step_scale is None:
                step_scale = 0.9 / torch.linalg.eigvalsh(foundation._hessian(theta, alpha)).max().item()
            weight, bias = (t.clone().requires_grad_(True) for t in foundation._unflatten(theta.detach()))
            cls_inner, mm_inner, cls_outer = foundation._losses(weight, bias)
            values.append(
                alpha_hypergradient(
                    cls_inner, mm_inner, alpha, cls_outer, [weight, bias], approx, terms, step_scale, 0.0
                )
            )
        agree = sum((v > 0) == (e > 0) for v, e in zip(values, exact, strict=True)) / len(values)
        correlation = float(torch.corrcoef(torch.tensor([values, exact], dtype=torch.float64))[0, 1])
        ratio = common.median([v / e for v, e in zip(values, exact, strict=True) if e != 0])
        rows.append([label, f"{agree:.0%}", correlation, ratio])
    return rows


def _exact(foundation, theta, alpha) -> float:
    import torch

    g_cls, g_mm, v = (foundation._flat_grad(i, theta) for i in range(3))
    return float(-(g_mm - g_cls) @ torch.linalg.solve(foundation._hessian(theta, alpha), v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        default="synthetic,crema-tiny,crema-resnet18",
        help="comma-separated: synthetic, crema-tiny, crema-resnet18",
    )
    parser.add_argument("--repeats", type=int, default=2, help="recorded rounds per variant (after one warm-up)")
    parser.add_argument("--epochs-per-call", type=int, default=3, help="synthetic epochs per timed call")
    parser.add_argument("--steps-per-epoch", type=int, default=20, help="CREMA-D-shaped cases: steps per epoch")
    parser.add_argument("--frame-size", type=int, default=112, help="stored frame side (CREMA-D: 224)")
    parser.add_argument("--batch-size", type=int, help="CREMA-D-shaped cases (default 16 tiny, 4 ResNet18)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings on a shared machine)"
    )
    parser.add_argument("--all-variants", action="store_true", help="every approximation on the ResNet18 case too")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="another lb variant for the epoch table: NAME=KEY=VALUE,KEY=VALUE (e.g. "
        "every20=strategy.lb.update_every=20)",
    )
    parser.add_argument("--skip", default="", help="comma-separated tables to skip: epochs, costs, memory, accuracy")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # CASE:VARIANT, run by the memory table
    args = parser.parse_args()
    if args.memory_child:
        common.set_threads(args.threads)
        case, _, variant = args.memory_child.partition(":")
        memory_child(case, variant, args)
        return

    common.use_private_registry()
    common.set_threads(args.threads)
    print(f"lb_overhead: {common.machine_line()}")
    print(f"note: {common.INTERLEAVE_NOTE}")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    skip = set(args.skip.split(","))
    if "epochs" not in skip:
        rows = []
        for case in cases:
            rows += epoch_ratios(case, args)
        common.print_table(
            [
                "case",
                "variant",
                "best s/epoch",
                "samples/s",
                "ratio (median)",
                "per-round range",
                "ratio (best/best)",
                "target",
            ],
            rows,
            "Epoch time / heuristic's epoch time (target <= 1.10 at default settings)",
        )
    if "costs" not in skip:
        rows = []
        for case in cases:
            if case != "crema-resnet18" or args.all_variants:
                rows += hypergradient_costs(case, args)
        common.print_table(
            ["case", "hypergradient", "cost in steps", "every 1", "every 10", "every 25", "every 50"],
            rows,
            "One hypergradient, in training steps, and the epoch ratio it implies per update_every",
        )
    if "memory" not in skip:
        rows = []
        for case in cases:
            rows += memory_peaks(case, args)
        headers = ["case", "step", "peak RSS GB", "step's own GB", "peak / plain", "own / plain"]
        if args.device != "cpu":
            headers.append("CUDA peak / plain")
        common.print_table(
            [*headers, "target"],
            rows,
            "Peak memory of one training step with a hypergradient / of a plain step (target <= 1.2 at the "
            "default); own = peak above the resident set before the step",
        )
    if "accuracy" not in skip:
        common.print_table(
            ["approximation", "sign agrees", "correlation", "median ratio"],
            foundation_accuracy(),
            "Against the exact implicit gradient (tests/test_hypergradient.py's problem, 36 points)",
        )


if __name__ == "__main__":
    main()
