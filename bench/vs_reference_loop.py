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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="decode-bound,tiny", help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--samples", type=int, default=256, help="training samples written")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--frame-size", type=int, default=224, help="frame side (CREMA-D: 224)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers, both loops")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings on a shared machine)"
    )
    args = parser.parse_args()

    common.use_private_registry()
    common.set_threads(args.threads)
    print(f"vs_reference_loop: {common.machine_line()}")
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
