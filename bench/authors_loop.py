"""The authors' own OGM-GE CREMA-D training, run from a checkout of their repository, for ``whole_run.py``.

``whole_run.py --authors-checkout PATH`` adds this as a third loop to its rounds, so that the published loop it
measures dmgl against (``vs_reference_loop.py``'s re-implementation of that loop's per-sample work, on dmgl's model)
is itself checked against the authors' code in the same run of the bench. Nothing of theirs is copied here: their
modules are imported from ``PATH`` (``git clone https://github.com/GeWu-Lab/OGM-GE_CVPR2022 PATH``) and driven as
their ``main()`` drives them:

* their ``CramedDataset`` (``librosa.load`` at 22.05 kHz, STFT, Pillow transforms per sample) reads files written
  in their layout: ``AudioWAV/<clip>.wav``, ``Image-<fps>-FPS/<clip>/*.jpg`` (``--fps`` is their frame count), and
  ``data/CREMAD/train.csv`` / ``test.csv`` under the working directory, as their code expects;
* their ``AVClassifier`` (concat fusion, their ResNet18 x 2), ``weight_init``, ``torch.nn.DataParallel`` (which on a
  machine without CUDA calls the module directly), SGD (momentum 0.9, weight decay 1e-4) and StepLR;
* per epoch their ``train_epoch`` (OGM-GE modulation, alpha 0.8 as their README recommends for CREMA-D) and
  ``valid`` on the test split, and the model saved with ``torch.save`` when its accuracy is the best so far.

Where this differs from their ``main()``, for the measurement only: the device is the bench's (their ``main()``
calls ``.cuda()`` unconditionally), the loaders use the bench's worker count (theirs: 32) and pin no memory on a
CPU, and the end of each optimiser step is timed by a step hook. Their ``main.py`` imports
``torch.utils.tensorboard``, so the ``tensorboard`` package must be installed (``pip install tensorboard``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

CREMA_CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # their class_dict's order
AUTHORS_FILES = ("main.py", "dataset/CramedDataset.py", "models/basic_model.py", "utils/utils.py")
OGM_GE_ALPHA_CREMA_D = 0.8


def check_checkout(checkout: Path) -> Path:
    """``checkout`` resolved, once it holds the authors' files this driver imports; an error naming what is missing."""
    checkout = checkout.expanduser().resolve()
    missing = [name for name in AUTHORS_FILES if not (checkout / name).is_file()]
    if missing:
        raise SystemExit(
            f"--authors-checkout {checkout} is not a checkout of GeWu-Lab/OGM-GE_CVPR2022 (missing: "
            f"{', '.join(missing)}); clone it with: git clone https://github.com/GeWu-Lab/OGM-GE_CVPR2022 {checkout}"
        )
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise SystemExit(
            "the authors' main.py imports torch.utils.tensorboard, which needs the tensorboard package: "
            "pip install tensorboard"
        ) from None
    return checkout


def write_authors_files(dataset, folder: Path, indices, split: str, frames: int) -> list[str]:
    """Samples ``indices`` of ``split`` in the authors' CREMA-D layout under ``folder``: a 16 kHz WAV per clip (as
    CREMA-D's AudioWAV), ``frames`` JPEGs of its stored frames, and the split's CSV rows (clip, emotion code)."""
    import numpy as np
    import vs_reference_loop

    arrays = dataset.split(split)
    visual, labels = arrays.inputs["visual"], arrays.labels
    rng = np.random.default_rng(0)
    rows = []
    for index in indices:
        clip = f"{split}{index:05d}"
        frame_folder = folder / f"Image-{frames:02d}-FPS" / clip
        paths = [frame_folder / f"{k:05d}.jpg" for k in range(frames)]
        vs_reference_loop.write_clip_files(visual[index], folder / "AudioWAV" / f"{clip}.wav", paths, rng)
        rows.append([clip, CREMA_CLASSES[int(labels[index]) % len(CREMA_CLASSES)]])
    csv_path = folder / "data" / "CREMAD" / f"{split}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return [clip for clip, _ in rows]


def authors_child(args, checkout: Path, marks: dict[str, float], epoch_seconds: list[float]) -> float:
    """The authors' whole run on the whole-run case's samples (``vs_reference_loop._whole_run_setup``'s training
    rows, the whole test split); ``marks`` and ``epoch_seconds`` as the published child's. Returns the seconds from
    the files written to the end."""
    import torch
    import vs_reference_loop
    from torch.utils.data import DataLoader

    config, dataset, train_indices, folder = vs_reference_loop._whole_run_setup(args)
    marks["files_start"] = time.time()
    write_authors_files(dataset, folder, train_indices, "train", args.whole_run_frames)
    write_authors_files(dataset, folder, range(len(dataset.split("test").labels)), "test", args.whole_run_frames)
    marks["files_end"] = time.time()
    started = time.perf_counter()
    os.chdir(folder)  # their dataset reads ./data/CREMAD/<split>.csv
    sys.path.insert(0, str(checkout))
    import main as authors_main  # their main.py: train_epoch, valid and their modules' imports
    from dataset.CramedDataset import CramedDataset
    from models.basic_model import AVClassifier
    from utils.utils import setup_seed, weight_init

    their_args = argparse.Namespace(
        dataset="CREMAD",
        modulation="OGM_GE",
        fusion_method="concat",
        fps=args.whole_run_frames,
        use_video_frames=args.whole_run_frames,
        audio_path=str(folder / "AudioWAV"),
        visual_path=str(folder),
        batch_size=config.train.batch_size,
        epochs=args.whole_run_epochs,
        optimizer="sgd",
        learning_rate=0.001,
        lr_decay_step=70,
        lr_decay_ratio=0.1,
        modulation_starts=0,
        modulation_ends=50,
        alpha=OGM_GE_ALPHA_CREMA_D,
        ckpt_path=str(folder / "ckpt"),
        train=True,
        use_tensorboard=False,
        tensorboard_path=None,
        random_seed=0,
        gpu_ids="0",
    )
    setup_seed(their_args.random_seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AVClassifier(their_args)
    model.apply(weight_init)
    model.to(device)
    model = torch.nn.DataParallel(model, device_ids=[0] if device.type == "cuda" else [])
    optimizer = torch.optim.SGD(model.parameters(), lr=their_args.learning_rate, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, their_args.lr_decay_step, their_args.lr_decay_ratio)

    def step_ended(optimizer, args, kwargs) -> None:
        now = time.time()
        marks.setdefault("first_step_end", now)
        marks["last_step_end"] = now

    optimizer.register_step_post_hook(step_ended)
    loaders = {
        split: DataLoader(
            CramedDataset(their_args, mode=split),
            batch_size=their_args.batch_size,
            shuffle=split == "train",
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
        )
        for split in ("train", "test")
    }
    if len(loaders["train"].dataset) != len(train_indices):
        raise SystemExit(f"the authors' dataset found {len(loaders['train'].dataset)} of {len(train_indices)} clips")
    best = 0.0
    Path(their_args.ckpt_path).mkdir(exist_ok=True)
    for epoch in range(their_args.epochs):
        epoch_started = time.perf_counter()
        authors_main.train_epoch(their_args, epoch, model, device, loaders["train"], optimizer, scheduler)
        epoch_seconds.append(time.perf_counter() - epoch_started)
        accuracy, _, _ = authors_main.valid(their_args, model, device, loaders["test"])
        if accuracy > best:
            best = accuracy
            torch.save({"saved_model": model.state_dict(), "epoch": epoch}, Path(their_args.ckpt_path) / "best.pth")
    return time.perf_counter() - started
