"""The GPU check behind bench/gpu.sh: is dmgl fast on a CUDA machine (H100 class)? Under 5 minutes.

Sections, each printed as soon as it is measured (a failing section prints its error and the rest still run):

1. environment: torch, CUDA, the device, bf16 support;
2. matmul peak: an N x N x N bf16 matrix product (N = 8192), the yardstick for TFLOP/s;
3. data: a CREMA-D-shaped prepared dataset written with the real PreparedWriter (257x299 float32 spectrogram,
   uint8 frames 224 px; 3 frames stored by default, the 3 the recipe samples) — no registry, no MLflow needed;
4. training throughput, ResNet18 x 2 at batch 256 (the crema-d recipe's model, heuristic alpha), variants
   interleaved epoch by epoch: dmgl's default (bf16 autocast + channels_last), + cudnn.benchmark, and fp32
   without channels_last (the lineage's way); samples/s and step time from the trainer's own per-epoch metrics,
   achieved TFLOP/s (FLOPs of one step counted by torch.utils.flop_counter) against the matmul peak, peak memory;
5. LB overhead on the GPU: epoch time of lb (default settings, and neumann K=3) / heuristic, interleaved;
6. loader / model: samples/s of the training loader (workers, pinned memory, copy to the GPU) over samples/s of
   training steps on one batch already on the GPU (target >= 3);
7. torch.compile of the model (compile time and samples/s against the default), if time is left.

    bench/gpu.sh                                   # on the GPU machine
    python bench/gpu_check.py --device cpu --tiny  # dry run of every path on a CPU, in a minute or two
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SUMMARY: list[list] = []


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def section(title: str, budget: Budget, needs: float, call) -> object:
    print(f"\n### {title}  ({budget.left():.0f} s of the budget left)", flush=True)
    if budget.left() < needs:
        print(f"skipped: needs about {needs:.0f} s", flush=True)
        SUMMARY.append([title, "skipped (time)", "", ""])
        return None
    started = time.perf_counter()
    try:
        result = call()
        gc.collect()  # the section's trainers go, and with them their loader worker processes
    except Exception as error:  # a diagnostic run reports every section it can, whatever breaks in one
        traceback.print_exc()
        print(f"FAILED: {type(error).__name__}: {error}", flush=True)
        SUMMARY.append([title, f"FAILED: {type(error).__name__}", "", ""])
        return None
    print(f"({time.perf_counter() - started:.1f} s)", flush=True)
    return result


def environment(args) -> None:
    import torch

    print(
        f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else '-'}, {os.cpu_count()} CPUs"
    )
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available here: this check needs a GPU (or run with --device cpu --tiny)")
        props = torch.cuda.get_device_properties(0)
        print(
            f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, "
            f"capability {props.major}.{props.minor}, bf16 supported: {torch.cuda.is_bf16_supported()}"
        )
    SUMMARY.append(["device", torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "", ""])


def matmul_peak(args) -> float:
    import torch

    device = torch.device(args.device)
    n = 1024 if args.tiny else 8192
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats = 10

    def products() -> None:
        for _ in range(repeats):
            a @ b

    seconds = common.timed(products, sync=args.device == "cuda")
    tflops = 2 * n**3 * repeats / seconds / 1e12
    print(f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} matrix product: {tflops:.1f} TFLOP/s")
    SUMMARY.append(["matmul peak", f"{tflops:.1f} TFLOP/s", "", ""])
    return tflops


def write_data(args, home: Path):
    from dmgl_cli.data.prepared import PreparedDataset

    # enough training samples for `steps` batches after the 10% validation carve-out
    train = math.ceil(args.steps_per_epoch * args.batch_size / 0.9) + 8
    audio_shape = (64, 64) if args.tiny else common.CREMA_AUDIO_SHAPE
    destination = home / "datasets" / "gpu-crema-shaped"
    started = time.perf_counter()
    common.write_crema_shaped_at(
        destination,
        "gpu-crema-shaped",
        train,
        args.batch_size,
        frames=args.stored_frames,
        frame_size=args.frame_size,
        audio_shape=audio_shape,
    )
    dataset = PreparedDataset(destination)
    size = sum(f.stat().st_size for f in destination.rglob("*.npy")) / 2**30
    print(
        f"{train} training samples: audio {list(audio_shape)} float32, {args.stored_frames} frames "
        f"{args.frame_size}px uint8; {size:.2f} GiB written in {time.perf_counter() - started:.1f} s"
    )
    return dataset


def overrides(args, strategy: str = "heuristic", extra: tuple[str, ...] = ()) -> list[str]:
    width = common.TINY_WIDTH if args.tiny else 64
    settings = common.crema_overrides(
        "gpu-crema-shaped", "resnet18", width, args.batch_size, sampled_frames=min(3, args.stored_frames)
    )
    settings = [s for s in settings if not s.startswith("data.num_workers")]
    return [
        *settings,
        f"data.num_workers={args.workers}",
        f"train.device={args.device}",
        f"strategy.name={strategy}",
        *extra,
    ]


def runner(args, dataset, strategy: str = "heuristic", extra: tuple[str, ...] = ()):
    return common.EpochRunner(
        common.load("crema-d", overrides(args, strategy, extra)), dataset=dataset, eval_workers=min(2, args.workers)
    )


def step_flops(trainer) -> float:
    """FLOPs of one training step (forward + backward) on one batch, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from dmgl_cli.device import autocast as _autocast
    from dmgl_cli.device import to_device as _to_device
    from dmgl_cli.losses import total_loss
    from dmgl_cli.train import compute_losses

    batch = next(iter(trainer.train_loader))
    inputs, labels = _to_device(batch, trainer.device)
    counter = FlopCounterMode(display=False)
    with counter:
        with _autocast(trainer.device, trainer.config.train.amp):
            output = trainer.method.forward(trainer.model, inputs, training=True)
        cls_loss, mm_loss = compute_losses(trainer.method, trainer.config, output, labels)
        total_loss(0.5, cls_loss, mm_loss).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def report_memory_formats(trainer, label: str) -> None:
    """Whether each encoder's first convolution sees channels_last input and gives channels_last output."""
    import torch

    from dmgl_cli.device import autocast as _autocast
    from dmgl_cli.device import to_device as _to_device

    seen: dict[str, str] = {}
    hooks = []
    for name, encoder in trainer.model.encoders.items():

        def record(module, inputs, output, name=name):
            def layout(t) -> str:
                if t.shape[1] == 1:
                    return "1 channel (either layout)"
                return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "NCHW"

            seen[name] = f"input {layout(inputs[0])}, output {layout(output)}, {output.dtype}"

        hooks.append(encoder.trunk.conv1.register_forward_hook(record))
    batch = next(iter(trainer.train_loader))
    inputs, _ = _to_device(batch, trainer.device)
    try:
        with torch.no_grad(), _autocast(trainer.device, trainer.config.train.amp):
            trainer.model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    print(f"{label}: first convolution " + "; ".join(f"{m}: {text}" for m, text in seen.items()))


def throughput(args, dataset, peak: float | None) -> float | None:
    import torch

    cuda = args.device == "cuda"
    variants = {
        "dmgl default (bf16 autocast, channels_last)": runner(args, dataset),
        "dmgl + cudnn.benchmark": runner(args, dataset),
        "fp32, no channels_last (lineage)": runner(args, dataset, extra=("train.amp=false",)),
    }
    lineage = variants["fp32, no channels_last (lineage)"].trainer
    lineage.model = lineage.model.to(memory_format=torch.contiguous_format)
    for encoder in lineage.model.encoders.values():  # NCHW inputs too, as ToTensor gives the lineage's loaders
        encoder.trunk.register_forward_pre_hook(lambda module, inputs: tuple(x.contiguous() for x in inputs))
    report_memory_formats(variants["dmgl default (bf16 autocast, channels_last)"].trainer, "dmgl default")
    report_memory_formats(lineage, "lineage")
    flops = step_flops(variants["dmgl default (bf16 autocast, channels_last)"].trainer)
    print(f"one training step: {flops / 1e12:.2f} TFLOP (forward + backward, batch {args.batch_size})")
    memory: dict[str, float] = {}

    def call(name: str):
        def run() -> float:
            torch.backends.cudnn.benchmark = name == "dmgl + cudnn.benchmark"
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            metrics = variants[name].epoch()
            if cuda:
                memory[name] = max(memory.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            return metrics["epoch_seconds"]

        return run

    times = common.interleave({name: call(name) for name in variants}, args.epochs, warmup=1)
    torch.backends.cudnn.benchmark = False
    rows = []
    best = None
    for name, values in times.items():
        steps = len(variants[name].trainer.train_loader)
        step = common.median(values) / steps
        samples = args.batch_size / step
        achieved = flops / step / 1e12
        rows.append(
            [
                name,
                samples,
                1000 * step,
                achieved,
                f"{100 * achieved / peak:.0f}%" if peak else "-",
                memory.get(name, float("nan")),
            ]
        )
        if name.startswith("dmgl default"):
            best = samples
            SUMMARY.append(
                [
                    "train samples/s (default)",
                    f"{samples:.0f}",
                    f"{1000 * step:.1f} ms/step",
                    f"{achieved:.1f} TFLOP/s = {100 * achieved / peak:.0f}% of peak" if peak else "",
                ]
            )
    common.print_table(
        ["variant", "samples/s", "ms/step", "TFLOP/s", "of matmul peak", "peak GiB"],
        rows,
        f"ResNet18 x 2, batch {args.batch_size}, {steps} steps/epoch, median of {args.epochs} epochs",
    )
    return best


def lb_overhead(args, dataset) -> None:
    variants = {
        "heuristic": runner(args, dataset),
        "lb default": runner(args, dataset, "lb"),
        "lb neumann K=3": runner(
            args, dataset, "lb", ("strategy.lb.approx=neumann", "strategy.lb.terms=3", "strategy.lb.scale=0.01")
        ),
    }
    lb = variants["lb default"].config.strategy.lb
    print(
        f"lb default: approx {lb.approx}, update_every {lb.update_every}, outer batch "
        f"{lb.outer_batch_size or 'train batch'}; {len(variants['heuristic'].trainer.train_loader)} steps/epoch"
    )
    times = common.interleave(
        {name: (lambda r=r: r.epoch()["epoch_seconds"]) for name, r in variants.items()}, args.epochs, warmup=1
    )
    rows = []
    for name, values in times.items():
        ratios = common.paired_ratios(values, times["heuristic"])
        verdict = f"<= 1.10 {common.verdict(common.median(ratios), 1.10, True)}" if name == "lb default" else ""
        rows.append([name, common.median(values), common.median(ratios), common.spread(ratios), verdict])
        if name == "lb default":
            SUMMARY.append(
                ["LB overhead (lb default / heuristic)", f"{common.median(ratios):.3f}", "target <= 1.10", verdict]
            )
    common.print_table(
        ["strategy", "s/epoch", "ratio vs heuristic", "per-round range", "target"],
        rows,
        "LB overhead on this device (epochs interleaved)",
    )


def loader_ratio(args, dataset) -> None:
    import dataloader

    counts = sorted({0, args.workers})
    # keyed by (frame store, workers): this section's dataset has raw frames
    runners = {("raw", w): runner(args, dataset, extra=(f"data.num_workers={w}",)) for w in counts}
    tables = dataloader.measure("gpu-crema", runners, args.loader_batches, 3, args.epochs)
    rows = tables["rates"]
    common.print_table(
        ["case", "store", "what", "samples/s", "loader / model", "per-round range", "target"],
        rows,
        "Loader samples/s (to the device) / model samples/s (target >= 3)",
    )
    common.print_table(
        [
            "case",
            "store",
            "read kB/sample",
            "of it frames",
            "input kB/sample",
            "of it frames",
            "read / input",
            "before",
        ],
        tables["bytes"],
        "Bytes per sample read from the store / bytes the model consumes",
    )
    common.print_table(
        ["case", "store", "workers", "RSS before GB", "peak RSS GB", "peak PSS GB", "PSS added GB"],
        tables["memory"],
        "Memory of this process and the loader's workers over one epoch",
    )
    common.print_table(
        ["case", "store", "loader stage", "ms per sample"], tables["parts"], "Where the loader's time goes"
    )
    for row in rows[1:]:
        SUMMARY.append([f"loader / model, {row[2]}", f"{row[4]:.2f}", "target >= 3", row[6]])


def compiled(args, dataset) -> None:
    eager = runner(args, dataset)
    target = runner(args, dataset, extra=("train.compile=true",))  # the trainer's own torch.compile
    started = time.perf_counter()
    first = target.epoch()["epoch_seconds"]  # includes compiling forward and backward
    print(f"first compiled epoch (compiling): {time.perf_counter() - started:.1f} s (epoch_seconds {first:.1f})")
    times = common.interleave(
        {"eager": lambda: eager.epoch()["epoch_seconds"], "torch.compile": lambda: target.epoch()["epoch_seconds"]},
        args.epochs,
        warmup=1,
    )
    ratio = common.median(common.paired_ratios(times["torch.compile"], times["eager"]))
    steps = len(eager.trainer.train_loader)
    rows = [[name, args.batch_size * steps / common.median(values)] for name, values in times.items()]
    common.print_table(["model", "samples/s"], rows, f"torch.compile: epoch time compiled / eager = {ratio:.3f}")
    SUMMARY.append(["torch.compile epoch time / eager", f"{ratio:.3f}", "< 1 helps", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) | cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU dry run of every code path")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--epochs", type=int, help="recorded epochs per variant (after one warm-up)")
    parser.add_argument("--frame-size", type=int)
    parser.add_argument("--stored-frames", type=int, default=3, help="frames stored per sample (CREMA-D keeps 10)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: CPUs - 4, at most 12)")
    parser.add_argument("--loader-batches", type=int, help="batches per loader measurement")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile section: auto = on CUDA when time is left",
    )
    parser.add_argument("--budget", type=float, default=270.0, help="seconds: sections that would not fit are skipped")
    args = parser.parse_args()
    tiny = args.tiny
    args.batch_size = args.batch_size or (8 if tiny else 256)
    args.steps_per_epoch = args.steps_per_epoch or (3 if tiny else 16)
    args.epochs = args.epochs or (1 if tiny else 2)
    args.frame_size = args.frame_size or (32 if tiny else common.CREMA_FRAME_SIZE)
    args.workers = (
        args.workers if args.workers is not None else (1 if tiny else max(2, min(12, (os.cpu_count() or 4) - 4)))
    )
    args.loader_batches = args.loader_batches or (2 if tiny else 12)

    budget = Budget(args.budget)
    home = common.use_private_registry("dmgl-gpu-check-")  # DMGL_HOME, or a temporary folder removed at exit
    print(
        f"gpu_check: device {args.device}{' (tiny dry run)' if tiny else ''}, batch {args.batch_size}, "
        f"{args.steps_per_epoch} steps/epoch, {args.epochs} recorded epochs per variant, {args.workers} loader "
        f"workers, frames {args.frame_size}px, registry {home}"
    )
    print(f"note: {common.INTERLEAVE_NOTE}")

    section("1. environment", budget, 0, lambda: environment(args))
    peak = section("2. matmul peak", budget, 10, lambda: matmul_peak(args))
    dataset = section("3. data", budget, 30, lambda: write_data(args, home))
    if dataset is None:
        raise SystemExit("no dataset: nothing else can be measured")
    section("4. training throughput", budget, 60, lambda: throughput(args, dataset, peak))
    section("5. LB overhead", budget, 40, lambda: lb_overhead(args, dataset))
    section("6. loader / model", budget, 25, lambda: loader_ratio(args, dataset))
    if args.compile == "on" or (args.compile == "auto" and args.device == "cuda"):
        section("7. torch.compile", budget, 100, lambda: compiled(args, dataset))
    common.print_table(["figure", "value", "", ""], SUMMARY, "Summary")


if __name__ == "__main__":
    main()
