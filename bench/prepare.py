"""``dmgl prepare crema-d`` per frame store: clips/s, wall time and the prepared dataset's size on disk, on generated
raw files.

The raw fixture is CREMA-D's public layout in its real formats (``AudioWAV/*.wav`` 16 kHz PCM, ``VideoFlash/*.flv``
FLV1 video at a CREMA-D-like ~1.5 Mb/s), at the real clips' size by default: 480x360 at 30 fps, about 2.5 s.
Frames are stored at the preparer's real 224 px. The video content matters for the JPEG store's size, so by default
(``--content texture``) each clip shows smooth colour gradients that drift, a face-sized ellipse that moves, and
fine noise, which compresses roughly as a camera image does after FLV coding; ``--content flat`` is tests/rawgen.py's
solid colour with a moving block (JPEG's best case).

Every (frame store, worker count) prepares the same clips into its own dataset, interleaved (raw/1 jpeg/1 raw/2
... then again); clips/s and the wall time count the whole ``prepare_dataset`` call (decoding, JPEG encoding for the
jpeg store, writing the arrays, checksums, the manifest). Disk: the bytes of the visual files (``visual.npy``, or
``visual.jpeg`` + ``visual.offsets.npy``) and of the whole dataset folder, per clip, and projected to CREMA-D's
7,442 clips and Kinetics-Sounds' ~19k (frames only: its audio differs).

    python bench/prepare.py                      # 60 clips, frame stores raw and jpeg, workers 1 and 2
    python bench/prepare.py --workers 1 --frame-stores raw,jpeg --repeats 2
    python bench/prepare.py --clips-per-class 40 --workers 1,2,4,8    # on a bigger machine
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

sys.path.insert(0, str(common.ROOT / "tests"))

import rawgen  # noqa: E402

FRAME_STORES = ("raw", "jpeg")
CREMA_CLIPS = 7442
KINETICS_SOUNDS_CLIPS = 19_000
FLV_BIT_RATE = 1_500_000  # CREMA-D's 480x360 FLV files run at roughly this rate


def textured_frames(seed: int, frames: int, width: int, height: int):
    """Camera-like frames: drifting smooth gradients per channel, a moving ellipse, fine noise (uint8 RGB). The
    gradients drift by a phase shift, sin(t + s) = sin t cos s + cos t sin s, so each frame is a sum of fields
    computed once per clip."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = rng.uniform(0.5, 3.0, (2, 2, 3)) * 2 * np.pi / np.array([width, height], dtype=np.float32)[:, None]
    phases = rng.uniform(0, 2 * np.pi, (2, 3))
    angles = [waves[k, 0] * x[..., None] + waves[k, 1] * y[..., None] + phases[k] for k in range(2)]
    fields = [(amplitude * np.sin(a), amplitude * np.cos(a)) for amplitude, a in zip((35, 20), angles, strict=True)]
    base = rng.uniform(70, 180, 3).astype(np.float32)
    face = rng.uniform(60, 200, 3).astype(np.float32)
    noise = rng.normal(0, 4, (4, height, width, 3)).astype(np.float32)
    for index in range(frames):
        shift = 0.05 * index
        image = base + noise[index % len(noise)]
        for (sine, cosine), sign in zip(fields, (1, -1), strict=True):
            image += sine * np.cos(sign * shift) + cosine * np.sin(sign * shift)
        cx, cy = width / 2 + 30 * np.sin(shift), height / 2 + 10 * np.cos(shift)
        inside = ((x - cx) / (width / 5)) ** 2 + ((y - cy) / (height / 3)) ** 2 < 1
        image[inside] = 0.5 * image[inside] + 0.5 * face
        yield np.clip(image, 0, 255).astype(np.uint8)


def write_textured_video(path: Path, seed: int, frames: int, width: int, height: int, fps: int) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("flv", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = FLV_BIT_RATE
        for image in textured_frames(seed, frames, width, height):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_raw(root: Path, per_class: int, width: int, height: int, seconds: float, fps: int, content: str) -> int:
    """CREMA-D's layout, one WAV + one FLV per clip, ``per_class`` clips of each emotion."""
    count = 0
    for e, emotion in enumerate(rawgen.CREMA_EMOTIONS):
        for k in range(per_class):
            clip = f"{1001 + k}_DFA_{emotion}_XX"
            rawgen.write_wav(root / "AudioWAV" / f"{clip}.wav", seconds, 200 + 100 * e)
            video = root / "VideoFlash" / f"{clip}.flv"
            if content == "texture":
                write_textured_video(video, count, int(seconds * fps), width, height, fps)
            else:
                rawgen.write_video(video, int(seconds * fps), rawgen.COLOURS[e], width=width, height=height, fps=fps)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips-per-class", type=int, default=10, help="6 classes: 10 -> 60 clips")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument(
        "--frame-stores", default="raw,jpeg", help="comma-separated: raw (uint8 arrays), jpeg (-o frame_store=jpeg)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--video-size", default="480x360", help="raw FLV frame size (CREMA-D: 480x360)")
    parser.add_argument("--seconds", type=float, default=2.5, help="clip length (CREMA-D: ~2.5 s)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--content", default="texture", choices=["texture", "flat"], help="what the videos show")
    args = parser.parse_args()

    common.use_private_registry()
    from dmgl_cli.data.registry import DatasetRegistry
    from dmgl_cli.prepare import prepare_dataset

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    stores = [s.strip() for s in args.frame_stores.split(",") if s.strip()]
    unknown = sorted(set(stores) - set(FRAME_STORES))
    if unknown or not stores:
        parser.error(f"--frame-stores: {', '.join(unknown) or 'none given'}; choose from {', '.join(FRAME_STORES)}")
    width, height = (int(v) for v in args.video_size.lower().split("x"))
    print(f"prepare: {common.machine_line()}")
    print(f"note: {common.INTERLEAVE_NOTE}")
    raw = Path(tempfile.mkdtemp(prefix="dmgl-bench-raw-"))
    sizes: dict[str, tuple[int, int]] = {}  # store -> (visual bytes, total bytes)
    seconds: dict[str, list[float]] = {}
    try:
        started = time.perf_counter()
        clips = write_raw(raw, args.clips_per_class, width, height, args.seconds, args.fps, args.content)
        print(
            f"raw fixture: {clips} clips ({width}x{height} FLV at {args.fps} fps, {args.seconds} s, {args.content}; "
            f"WAV 16 kHz; {common.directory_bytes(raw / 'VideoFlash') / clips / 1e3:.0f} kB of FLV a clip) "
            f"written in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        runs = iter(range(1_000_000))

        def prepare(store: str, count: int):
            def call() -> float:
                name = f"crema-bench-{store}-w{count}-{next(runs)}"
                options = {"frame_store": store}
                took = common.timed(
                    lambda: prepare_dataset("crema-d", raw=raw, name=name, workers=count, options=options)
                )
                row = DatasetRegistry().get(name)
                path = Path(row["path"])
                sizes[store] = (common.directory_bytes(path, "visual."), common.directory_bytes(path))
                shutil.rmtree(path, ignore_errors=True)  # ~1.8 MB per clip in the raw store: keep the disk free
                DatasetRegistry().remove(name)
                seconds.setdefault(f"{store}, {count} workers", []).append(took)
                return clips / took

            return call

        # one unrecorded round first: it starts the worker server (which imports librosa and PyAV) once
        variants = {f"{s}, {w} workers": prepare(s, w) for w in workers for s in stores}
        rates = common.interleave(variants, args.repeats, warmup=1)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    rows = []
    for w in workers:
        for s in stores:
            key = f"{s}, {w} workers"
            first = rates[f"{s}, {workers[0]} workers"]
            against_raw = common.paired_ratios(rates[key], rates[f"raw, {w} workers"]) if "raw" in stores else []
            rows.append(
                [
                    s,
                    w,
                    common.median(rates[key]),
                    common.median(seconds[key][1:]),  # the warm-up round left out, as in the rates
                    common.median(common.paired_ratios(rates[key], first)),
                    common.median(against_raw) if against_raw else "-",
                    common.spread(against_raw) if s != "raw" else "",
                ]
            )
    common.print_table(
        ["store", "workers", "clips/s", "wall s", f"speed-up vs {workers[0]} worker(s)", "clips/s vs raw", "range"],
        rows,
        f"dmgl prepare crema-d on {clips} generated clips, 224 px frames ({os.cpu_count()} cores here; medians of "
        f"{args.repeats} rounds)",
    )
    disk = []
    for s in stores:
        visual, total = sizes[s]
        disk.append(
            [
                s,
                visual / 1e6,
                total / 1e6,
                visual / clips / 1e3,
                visual / clips / 10 / 1e3,
                total / clips / 1e3,
                total / clips * CREMA_CLIPS / 1e9,
                visual / clips * KINETICS_SOUNDS_CLIPS / 1e9,
            ]
        )
    common.print_table(
        [
            "store",
            "visual MB",
            "total MB",
            "visual kB/clip",
            "kB/frame",
            "total kB/clip",
            "CREMA-D 7,442 clips GB",
            "K-S 19k clips: frames GB",
        ],
        disk,
        f"Prepared dataset on disk ({clips} clips, 10 frames of 224x224x3 each; MB = 10^6 bytes)",
    )


if __name__ == "__main__":
    main()
