"""dmgl against a plain training loop written the lineage's way: epoch time of dmgl / epoch time of the reference.

Target: <= 0.5 where decoding dominates. Both train the same model (dmgl's MultimodalModel with the same
encoders, the same losses, SGD with the same settings, the same batch size and worker count) for one epoch on the
same samples:

* reference (OGM-GE / PMR style): a map-style Dataset whose ``__getitem__`` opens one spectrogram pickle and decodes
  3 JPEG frames with Pillow per sample, applies torchvision's RandomResizedCrop + RandomHorizontalFlip to each
  frame, the default collate, fp32 throughout (no autocast, no channels_last), ``.item()`` of the loss every step;
* dmgl: its trainer on the prepared arrays (memory-mapped, gathered a batch at a time, frames sampled and
  augmented on tensors), AMP and channels_last on CUDA, metrics summed on the device.

Cases: ``decode-bound`` uses small MLP encoders (well under a millisecond per sample, as a GPU-fast model is), where
the data path is the epoch; ``tiny`` and ``resnet18`` use ResNet18 encoders, where on a CPU the model dominates and
both loops take about as long. Epochs alternate (reference, dmgl, reference, dmgl ...).

    python bench/vs_reference_loop.py                                  # a few minutes on 2 CPU cores
    python bench/vs_reference_loop.py --cases decode-bound,tiny --samples 512 --workers 2
    python bench/vs_reference_loop.py --device cuda --cases resnet18 --batch-size 256 --samples 4096 --workers 8
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 0.5
SAMPLED_FRAMES = 3

CASES = {
    # name: (encoder overrides, description)
    "decode-bound": (
        [
            "model.encoders.audio.name=mlp",
            "model.encoders.visual.name=mlp",
            "model.encoders.audio.hidden=4",
            "model.encoders.visual.hidden=4",
            "model.encoders.audio.layers=1",
            "model.encoders.visual.layers=1",
            "model.embed_dim=32",
            "optim.lr=1.0e-6",
        ],  # raw 0-255 pixels into a linear layer: a small step keeps it finite
        "MLP encoders (hidden 4): the model is cheap, decoding dominates",
    ),
    "tiny": (
        [
            f"model.encoders.audio.options.width={common.TINY_WIDTH}",
            f"model.encoders.visual.options.width={common.TINY_WIDTH}",
            f"model.embed_dim={common.TINY_WIDTH * 8}",
        ],
        f"ResNet18 width {common.TINY_WIDTH} x 2",
    ),
    "resnet18": (
        ["model.encoders.audio.options.width=64", "model.encoders.visual.options.width=64", "model.embed_dim=512"],
        "ResNet18 x 2 (width 64)",
    ),
}


def write_reference_files(dataset, folder: Path, indices) -> list[tuple[Path, list[Path], int]]:
    """The lineage's files for the training samples ``indices``: <i>.pkl (the spectrogram) and <i>/frame_k.jpg
    (3 of the stored frames, evenly spaced)."""
    import numpy as np
    from PIL import Image

    from dmgl_cli.data.media import even_indices

    train = dataset.split("train")
    audio, visual, labels = train.inputs["audio"], train.inputs["visual"], train.labels
    stored = visual.shape[1]
    rows = []
    for index in indices:
        spectrogram = folder / "audio" / f"{index}.pkl"
        spectrogram.parent.mkdir(parents=True, exist_ok=True)
        with open(spectrogram, "wb") as handle:
            pickle.dump(np.asarray(audio[index], dtype=np.float32), handle)
        frames = []
        for k, position in enumerate(even_indices(stored, SAMPLED_FRAMES)):
            path = folder / "visual" / str(index) / f"frame_{k:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(visual[index, position])).save(path, format="JPEG", quality=90)
            frames.append(path)
        rows.append((spectrogram, frames, int(labels[index])))
    return rows


def reference_dataset(rows, frame_size: int):
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import Dataset
    from torchvision import transforms

    class ReferenceDataset(Dataset):
        """One sample per call: a pickle, 3 JPEG decodes, a crop + flip per frame — as the lineage's loaders do."""

        def __init__(self):
            self.augment = transforms.Compose(
                [
                    transforms.RandomResizedCrop(frame_size, scale=(0.64, 1.0), ratio=(1.0, 1.0)),
                    transforms.RandomHorizontalFlip(),
                ]
            )

        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, index: int):
            spectrogram, frame_paths, label = rows[index]
            with open(spectrogram, "rb") as handle:
                audio = pickle.load(handle)
            frames = [np.asarray(self.augment(Image.open(path).convert("RGB"))) for path in frame_paths]
            return {"audio": torch.from_numpy(audio), "visual": torch.from_numpy(np.stack(frames))}, label

    return ReferenceDataset()


class ReferenceLoop:
    """A plain loop: DataLoader over the per-sample dataset, fp32, loss.item() every step."""

    def __init__(self, config, dataset, rows, frame_size: int, workers: int, device):
        import torch
        from torch.utils.data import DataLoader

        from dmgl_cli.methods import build_method

        torch.manual_seed(0)
        self.config, self.device = config, device
        self.method = build_method(config)
        self.model = self.method.build_model(dataset.modalities, dataset.num_classes).to(device)
        optim = config.optim
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
        self.loader = DataLoader(
            reference_dataset(rows, frame_size),
            batch_size=config.train.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        self.losses: list[float] = []

    def epoch(self) -> float:
        import torch

        from dmgl_cli.losses import total_loss
        from dmgl_cli.train import compute_losses

        self.model.train()
        started = time.perf_counter()
        alpha = 0.5
        for inputs, labels in self.loader:
            inputs = {m: x.to(self.device) for m, x in inputs.items()}
            labels = labels.to(self.device)
            output = self.method.forward(self.model, inputs, training=True)
            cls_loss, mm_loss = compute_losses(self.method, self.config, output, labels)
            loss = total_loss(alpha, cls_loss, mm_loss)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.losses.append(loss.item())  # the lineage logs a float per step
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


def run_case(case: str, args) -> list[list]:
    extra, description = CASES[case]
    batch = args.batch_size
    # 3 stored frames, the 3 the reference decodes (the MLP encoder is built for the stored frame count)
    dataset_name = common.write_crema_shaped(
        f"crema-shaped-3f-{args.frame_size}-{args.samples}",
        args.samples,
        16,
        frames=SAMPLED_FRAMES,
        frame_size=args.frame_size,
    )
    overrides = [
        *common.crema_overrides(dataset_name, "resnet18", common.TINY_WIDTH, batch),
        *extra,
        "strategy.name=heuristic",
        f"train.device={args.device}",
        f"data.num_workers={args.workers}",
        "data.val_fraction=0.02",
    ]
    config = common.load("crema-d", overrides)
    runner = common.EpochRunner(config)
    dataset = common.open_dataset(dataset_name)
    folder = Path(tempfile.mkdtemp(prefix="dmgl-bench-reference-"))
    try:
        started = time.perf_counter()
        # the reference trains on the same samples dmgl's training split holds
        rows = write_reference_files(dataset, folder, runner.trainer.splits.train.indices.tolist())
        print(
            f"\n== {case}: {description}; {len(rows)} training samples, batch {batch}, {args.workers} workers, "
            f"frames {args.frame_size}px (reference files written in {time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        reference = ReferenceLoop(config, dataset, rows, args.frame_size, args.workers, runner.trainer.device)
        # the same dmgl run without the frame flip/crop: how much of dmgl's epoch its augmentation takes
        plain = common.EpochRunner(common.load("crema-d", [*overrides, "data.options.augment.visual=none"]))
        times = common.interleave(
            {
                "reference": reference.epoch,
                "dmgl": lambda: runner.epoch()["epoch_seconds"],
                "dmgl, no flip/crop": lambda: plain.epoch()["epoch_seconds"],
            },
            args.repeats,
            warmup=1,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    samples = len(runner.trainer.train_loader) * batch
    rows = []
    for name in ("dmgl", "dmgl, no flip/crop"):
        ratios = common.paired_ratios(times[name], times["reference"])
        target = (
            "(model-bound)"
            if case != "decode-bound"
            else (f"<= {TARGET:g} {common.verdict(common.median(ratios), TARGET, True)}" if name == "dmgl" else "")
        )
        rows.append(
            [
                case,
                name,
                samples / common.median(times["reference"]),
                samples / common.median(times[name]),
                common.median(ratios),
                common.spread(ratios),
                target,
            ]
        )
    return rows


# ----------------------------------------------------------------------------------- whole run, the published loop

WHOLE_RUN_TIME_TARGET = 0.8
WHOLE_RUN_MEMORY_TARGET = 1.0
PUBLISHED_SPECTROGRAM = (257, 188)  # the published loop's STFT of 3 s at 22.05 kHz, n_fft 512, hop 353


def write_clip_files(stored_frames, wav: Path, frame_paths: list[Path], rng) -> None:
    """One clip's raw files as a published loop reads them: 2.5 s of noise as a 16 kHz 16-bit WAV, and
    ``len(frame_paths)`` of the clip's stored frames, evenly spaced, as JPEGs (quality 90)."""
    import numpy as np
    import soundfile
    from PIL import Image

    wav.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(wav, (0.1 * rng.standard_normal(40_000)).astype(np.float32), 16_000, subtype="PCM_16")
    count = len(frame_paths)
    for k, path in enumerate(frame_paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = np.asarray(stored_frames[k * len(stored_frames) // count])
        Image.fromarray(frame).save(path, format="JPEG", quality=90)


def write_published_files(dataset, folder: Path, indices, split: str, frames: int) -> list[tuple[str, list[str], int]]:
    """The published loop's files for samples ``indices`` of ``split``: a 16 kHz WAV per clip (its spectrogram is
    computed per sample, as the published dataset does) and ``frames`` JPEG frames per clip (its 1-fps extraction),
    the clip's stored frames at 224 px."""
    import numpy as np

    arrays = dataset.split(split)
    visual, labels = arrays.inputs["visual"], arrays.labels
    rng = np.random.default_rng(0)
    rows = []
    for index in indices:
        wav = folder / split / f"{index}.wav"
        paths = [folder / split / str(index) / f"frame_{k:05d}.jpg" for k in range(frames)]
        write_clip_files(visual[index], wav, paths, rng)
        rows.append((str(wav), [str(path) for path in paths], int(labels[index])))
    return rows


def published_dataset(rows, training: bool):
    """The published CREMA-D dataset's per-sample work: librosa.load at 22.05 kHz, tile to 3 s, clip, STFT
    (n_fft 512, hop 353), log; each frame opened with Pillow and RandomResizedCrop(224) + flip (training) or
    Resize(224) (evaluation), ToTensor, Normalize; frames stacked as [C, T, H, W]."""
    import librosa
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import Dataset
    from torchvision import transforms

    normalise = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if training:
        transform = transforms.Compose(
            [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise]
        )
    else:
        transform = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(), normalise])

    class PublishedDataset(Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, index: int):
            wav, frame_paths, label = rows[index]
            samples, _ = librosa.load(wav, sr=22050)
            samples = np.clip(np.tile(samples, 3)[: 22050 * 3], -1.0, 1.0)
            spectrogram = np.log(np.abs(librosa.stft(samples, n_fft=512, hop_length=353)) + 1e-7)
            images = torch.stack([transform(Image.open(path).convert("RGB")) for path in frame_paths])
            return torch.from_numpy(spectrogram), images.permute(1, 0, 2, 3), label

    return PublishedDataset()


def _published_child(args, marks: dict[str, float] | None = None, epoch_seconds: list[float] | None = None) -> float:
    """The published loop, whole run: per epoch a training pass (fp32, NCHW, loss.item() per step), then the test
    split scored and the model saved when its accuracy is the best so far. The model is dmgl's (same encoders,
    same losses), laid out NCHW as the published code's is; its spectrogram and frames come from the files above.
    Returns the seconds from the files written to the end; ``marks`` gets wall-clock times (``time.time()``) of the
    files' writing, the first step's end and the last step's end, ``epoch_seconds`` each training pass's seconds
    (for bench/whole_run.py)."""
    marks = {} if marks is None else marks
    epoch_seconds = [] if epoch_seconds is None else epoch_seconds
    import torch
    from torch.utils.data import DataLoader

    from dmgl_cli.losses import total_loss
    from dmgl_cli.methods import build_method
    from dmgl_cli.train import compute_losses

    config, dataset, train_indices, folder = _whole_run_setup(args)
    marks["files_start"] = time.time()
    started = time.perf_counter()
    train_rows = write_published_files(dataset, folder, train_indices, "train", args.whole_run_frames)
    test_rows = write_published_files(
        dataset, folder, range(len(dataset.split("test").labels)), "test", args.whole_run_frames
    )
    written = time.perf_counter() - started
    marks["files_end"] = time.time()
    started = time.perf_counter()
    torch.manual_seed(0)
    method = build_method(config)
    model = method.build_model(_model_specs(dataset, config), dataset.num_classes)
    for module in model.modules():  # NCHW, as the published code runs
        if hasattr(module, "channels_last_on"):
            module.channels_last_on = lambda device: False  # type: ignore[method-assign]
    optim = config.optim
    optimizer = torch.optim.SGD(
        model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
    )
    loaders = {
        split: DataLoader(
            published_dataset(rows, split == "train"),
            batch_size=config.train.batch_size,
            shuffle=split == "train",
            num_workers=args.workers,
        )
        for split, rows in (("train", train_rows), ("test", test_rows))
    }

    def batch_inputs(audio, visual):
        # dmgl's encoders take [B, F, T] spectrograms and [B, T, H, W, C] frames; the published tensors are the same
        # numbers in another layout, normalised already (so dmgl's normaliser adds one affine map per pixel)
        return {"audio": audio, "visual": (visual.permute(0, 2, 3, 4, 1) * 255).clamp_(0, 255).to(torch.uint8)}

    best = -1.0
    for _ in range(config.train.epochs):
        model.train()
        epoch_started = time.perf_counter()
        for audio, visual, labels in loaders["train"]:
            output = method.forward(model, batch_inputs(audio, visual), training=True)
            cls_loss, mm_loss = compute_losses(method, config, output, labels)
            loss = total_loss(0.5, cls_loss, mm_loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
            marks.setdefault("first_step_end", time.time())
        marks["last_step_end"] = time.time()
        epoch_seconds.append(time.perf_counter() - epoch_started)
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for audio, visual, labels in loaders["test"]:
                output = method.forward(model, batch_inputs(audio, visual), training=False)
                correct += int((method.predict(output).argmax(1) == labels).sum())
                total += len(labels)
        if correct / total > best:
            best = correct / total
            torch.save(model.state_dict(), folder / "best.pt")
    print(f"  (published files written in {written:.1f} s, not counted)", file=sys.stderr)
    return time.perf_counter() - started


def _model_specs(dataset, config):
    from dmgl_cli.data.transforms import model_input_specs

    return model_input_specs(dataset.modalities, config)


def _whole_run_setup(args):
    """The dmgl config of the whole-run case, its dataset, dmgl's training rows and a scratch folder."""
    from dmgl_cli.data.loader import make_splits

    config = common.load("crema-d", _whole_run_overrides(args))
    dataset = common.open_dataset(config.dataset)
    train = make_splits(dataset, config.data.val_fraction, config.data.split_seed).train
    folder = Path(tempfile.mkdtemp(prefix="dmgl-bench-published-"))
    return config, dataset, train.indices.tolist(), folder


def _whole_run_overrides(args) -> list[str]:
    return [
        *common.crema_overrides(_whole_run_dataset_name(args), "resnet18", 64, args.batch_size, args.whole_run_frames),
        "strategy.name=constant",
        "strategy.alpha=0.5",
        f"train.epochs={args.whole_run_epochs}",
        f"train.eval_batch_size={args.batch_size * 4}",
        f"train.device={args.device}",
        f"data.num_workers={args.workers}",
    ]


def _whole_run_dataset_name(args) -> str:
    return f"crema-published-shapes-{args.whole_run_samples}-{args.frame_store}"


def _dmgl_child(args) -> float:
    """dmgl's whole run: Trainer.fit for the same epochs (validation every epoch, test at each new best epoch and
    at the last), checkpoints written to disk with torch.save as the run recorder does (MLflow not included)."""
    import torch

    from dmgl_cli.train import Trainer

    config, dataset, _, folder = _whole_run_setup(args)

    class DiskSink:
        def log_metrics(self, metrics, step) -> None:
            pass

        def save_checkpoint(self, name, state) -> None:
            torch.save(state, folder / f"{name}.pt")

    started = time.perf_counter()
    Trainer(config, dataset, 0, DiskSink()).fit()
    return time.perf_counter() - started


def run_whole(args) -> list[list]:
    """Whole runs of the published loop and of dmgl at equal input shapes, each in its own process (interleaved),
    with the peak RSS and PSS of its process tree (DataLoader workers included)."""
    import json
    import subprocess

    name = _whole_run_dataset_name(args)
    common.write_crema_shaped(
        name,
        args.whole_run_samples,
        args.whole_run_test,
        audio_shape=PUBLISHED_SPECTROGRAM,
        frame_store=args.frame_store,
    )
    print(
        f"\n== whole run: spectrogram {PUBLISHED_SPECTROGRAM}, {args.whole_run_frames} frame(s) of 224 px, ResNet18 "
        f"x 2, batch {args.batch_size}, {args.whole_run_epochs} epochs, {args.whole_run_samples} train "
        f"(10% carved for dmgl's validation) / {args.whole_run_test} test, {args.workers} workers, dmgl frame store "
        f"{args.frame_store}",
        flush=True,
    )
    base = [sys.executable, __file__, "--threads", str(args.threads), "--workers", str(args.workers)]
    base += ["--batch-size", str(args.batch_size), "--device", args.device, "--frame-store", args.frame_store]
    base += ["--whole-run-samples", str(args.whole_run_samples), "--whole-run-epochs", str(args.whole_run_epochs)]
    base += ["--whole-run-frames", str(args.whole_run_frames), "--whole-run-test", str(args.whole_run_test)]

    def child(which: str) -> dict[str, float]:
        process = subprocess.Popen([*base, "--whole-run-child", which], stdout=subprocess.PIPE, text=True)
        with common.MemoryWatch(process.pid, interval=0.2) as watch:
            output, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"the {which} run failed (exit {process.returncode})")
        seconds = json.loads(output.split("WHOLE ", 1)[1])["seconds"]
        return {"seconds": seconds, "rss": watch.peak_rss, "pss": watch.peak_pss}

    measured: dict[str, list[dict[str, float]]] = {"published": [], "dmgl": []}
    for round_number in range(args.repeats):
        for which in measured:
            measured[which].append(child(which))
            figures = measured[which][-1]
            print(
                f"  [round {round_number + 1}/{args.repeats}] {which}: {figures['seconds']:.1f} s, peak PSS "
                f"{common.gigabytes(figures['pss']):.2f} GB",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    label = f"whole run, {args.whole_run_frames} frame(s)"
    for which, runs in measured.items():
        seconds = common.median([r["seconds"] for r in runs])
        pss, rss = max(r["pss"] for r in runs), max(r["rss"] for r in runs)
        row = [label, which, seconds, common.gigabytes(pss), common.gigabytes(rss)]
        if which == "dmgl":
            time_ratios = common.paired_ratios(
                [r["seconds"] for r in runs], [r["seconds"] for r in measured["published"]]
            )
            pss_ratio = pss / max(r["pss"] for r in measured["published"])
            row += [
                f"{common.median(time_ratios):.3f} {common.spread(time_ratios)}",
                f"{pss_ratio:.3f}",
                f"time <= {WHOLE_RUN_TIME_TARGET:g} {common.verdict(common.median(time_ratios), WHOLE_RUN_TIME_TARGET, True)}"
                f", memory <= {WHOLE_RUN_MEMORY_TARGET:g} {common.verdict(pss_ratio, WHOLE_RUN_MEMORY_TARGET, True)}",
            ]
        else:
            row += ["", "", ""]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="decode-bound,tiny", help=f"comma-separated: {', '.join(CASES)}, whole-run")
    parser.add_argument("--samples", type=int, default=256, help="training samples written")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--frame-size", type=int, default=224, help="frame side (CREMA-D: 224)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers, both loops")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings on a shared machine)"
    )
    parser.add_argument("--frame-store", default="jpeg", help="whole run: dmgl's frame store, raw | jpeg")
    parser.add_argument("--whole-run-frames", type=int, default=1, help="whole run: frames per sample (1 or 3)")
    parser.add_argument("--whole-run-samples", type=int, default=128, help="whole run: training samples written")
    parser.add_argument("--whole-run-test", type=int, default=64, help="whole run: test samples written")
    parser.add_argument("--whole-run-epochs", type=int, default=2, help="whole run: epochs")
    parser.add_argument("--whole-run-child", help=argparse.SUPPRESS)  # published | dmgl | authors (whole runs)
    parser.add_argument("--authors-checkout", type=Path, help=argparse.SUPPRESS)  # for --whole-run-child authors
    args = parser.parse_args()

    common.use_private_registry()
    common.set_threads(args.threads)
    if args.whole_run_child:
        import json

        if args.whole_run_child in ("published", "authors"):
            marks: dict[str, float] = {}
            epoch_seconds: list[float] = []
            if args.whole_run_child == "published":
                seconds = _published_child(args, marks, epoch_seconds)
            else:
                import authors_loop

                checkout = authors_loop.check_checkout(args.authors_checkout)
                seconds = authors_loop.authors_child(args, checkout, marks, epoch_seconds)
            marks["end"] = time.time()
            found = {"seconds": seconds, "marks": marks, "epoch_seconds": epoch_seconds}
        else:
            found = {"seconds": _dmgl_child(args)}
        print("WHOLE " + json.dumps(found), flush=True)
        return
    print(f"vs_reference_loop: {common.machine_line()}")
    if "whole-run" in args.cases.split(","):
        common.print_table(
            [
                "case",
                "loop",
                "seconds (median)",
                "peak PSS GB",
                "peak RSS GB",
                "dmgl / published time",
                "dmgl / published PSS",
                "target",
            ],
            run_whole(args),
            "Whole run (training, evaluation, checkpoints), dmgl against the published loop at equal input shapes, "
            f"device {args.device}",
        )
        args.cases = ",".join(c for c in args.cases.split(",") if c.strip() and c != "whole-run")
        if not args.cases:
            return
    print(f"note: {common.INTERLEAVE_NOTE}")
    rows = [row for case in args.cases.split(",") if case.strip() for row in run_case(case.strip(), args)]
    common.print_table(
        ["case", "dmgl", "reference samples/s", "dmgl samples/s", "dmgl / reference time", "per-round range", "target"],
        rows,
        f"One training epoch, dmgl / the lineage's loop (target <= {TARGET:g} where "
        f"decoding dominates), device {args.device}",
    )


if __name__ == "__main__":
    main()
