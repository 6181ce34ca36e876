"""``dmgl prepare crema-d`` per frame store: clips/s, wall time and the prepared dataset's size on disk, on generated
raw files.

The raw fixture is CREMA-D's public layout in its real formats (``AudioWAV/*.wav`` 16 kHz PCM, ``VideoFlash/*.flv``
FLV1 video at a CREMA-D-like ~1.5 Mb/s), at the real clips' size by default: 480x360 at 30 fps, about 2.5 s.
Frames are stored at the preparer's real 224 px. The video content matters for the JPEG store's size, so by default
(``--content texture``) each clip shows smooth colour gradients that drift, a face-sized ellipse that moves, and
fine noise, which compresses roughly as a camera image does after FLV coding; ``--content flat`` is tests/rawgen.py's
solid colour with a moving block (JPEG's best case).

Every (frame store, audio store, worker count) prepares the same clips into its own dataset, interleaved (raw/1
jpeg/1 raw/2 ... then again); clips/s and the wall time count the whole ``prepare_dataset`` call (decoding, JPEG
encoding for the jpeg store, writing the arrays, checksums, the manifest). Audio stores (``--audio-stores``):
``pcm16``, the default (the clip's 16-bit samples; the spectrogram is computed when read), and ``spectrogram``
(the float32 spectrogram). Disk: the bytes of the visual files (``visual.npy``, or ``visual.jpeg`` +
``visual.offsets.npy``), of the audio files and of the whole dataset folder, per clip, and projected to
CREMA-D's 7,442 clips and Kinetics-Sounds' ~19k (frames only: its audio differs).

CPU seconds per clip are counted for this process and, apart, for the forkserver and its pool workers (user +
system, those that exited included), and "cores busy" is their sum over the wall time: a worker count that does not
speed prepare up either found no idle core (busy stays near the count of cores free) or spent its time elsewhere
(more CPU per clip: start-up, moving the decoded arrays between processes).

``--sections audio-dtype``: the same clips prepared with ``-o audio_dtype=float32`` and ``float16`` (the emotion
carried only by a faint tone in loud noise, so that a small model is partly right): the spectrogram's bytes, the
rounding, and the test accuracy of a small Concat model trained on each with the same seeds (paired), plus the
float32-trained weights scored on both inputs.

``--sections audio-read``: the CPU a loader worker spends reading a batch of CREMA-D audio from the spectrogram
store (a copy out of the memory map) and from the pcm16 store (the STFT of the stored samples).

    python bench/prepare.py                      # 60 clips, frame stores raw and jpeg, workers 1 and 2; audio dtype
    python bench/prepare.py --sections workers --workers 1 --frame-stores raw,jpeg --repeats 2
    python bench/prepare.py --sections workers --workers 1 --frame-stores jpeg --audio-stores pcm16,spectrogram
    python bench/prepare.py --sections workers --clips-per-class 40 --workers 1,2,4,8    # on a bigger machine
    python bench/prepare.py --sections audio-dtype --dtype-seeds 5
    python bench/prepare.py --sections audio-read --repeats 5    # a batch's audio read: pcm16 against spectrogram
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import rawgen  # noqa: E402

# bench/common.py imports torch at its top, and Python 3.11's forkserver has every pool worker re-run this script's
# top level (as __mp_main__): importing common here would cost each decoding worker torch's import (~1-2 s), which
# `dmgl prepare` (whose console script imports no torch) never pays. main() imports it.
common: Any = None

FRAME_STORES = ("raw", "jpeg")
AUDIO_STORES = ("pcm16", "spectrogram")
AUTHORS = "authors' extraction"
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


def authors_extraction(raw: Path, out: Path) -> None:
    """The authors' CREMA-D preprocessing, as their released script (OGM-GE, ``data/CREMAD/video_preprocessing.py``)
    does it: every FLV decoded with OpenCV, the first frame of each second written as a JPEG at the video's own size
    (OpenCV's default quality, 95), one file per frame; the audio stays in the WAV files, read at training time. One
    process, as the script runs."""
    import cv2

    for video in sorted((raw / "VideoFlash").glob("*.flv")):
        folder = out / video.stem
        folder.mkdir(parents=True)
        capture = cv2.VideoCapture(str(video))
        fps = max(int(capture.get(cv2.CAP_PROP_FPS)), 1)
        count = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            if count % fps == 0:
                cv2.imwrite(str(folder / f"{count:05d}.jpg"), image)
            count += 1
        capture.release()


def tree_cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) so far of (this process, every process below it): the forkserver and the pool
    workers it forked, counting those that have exited (a parent's cutime/cstime holds its reaped children's)."""
    own = os.times()
    tick = os.sysconf("SC_CLK_TCK")
    others = own.children_user + own.children_system  # reaped children of this process
    for pid in common._tree(os.getpid())[1:]:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited between the listing and the read
        # fields[11:15]: utime, stime, cutime, cstime (stat fields 14-17, counted after the command's ")")
        others += sum(int(value) for value in fields[11:15]) / tick
    return own.user + own.system, others


def workers_section(args, parser) -> None:
    from dmgl_cli.data.registry import DatasetRegistry
    from dmgl_cli.prepare import prepare_dataset

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    frame_stores = [s.strip() for s in args.frame_stores.split(",") if s.strip()]
    unknown = sorted(set(frame_stores) - set(FRAME_STORES))
    if unknown or not frame_stores:
        parser.error(f"--frame-stores: {', '.join(unknown) or 'none given'}; choose from {', '.join(FRAME_STORES)}")
    audio_stores = [s.strip() for s in args.audio_stores.split(",") if s.strip()]
    unknown = sorted(set(audio_stores) - set(AUDIO_STORES))
    if unknown or not audio_stores:
        parser.error(f"--audio-stores: {', '.join(unknown) or 'none given'}; choose from {', '.join(AUDIO_STORES)}")
    # a store: (frame store, audio store), named "jpeg, pcm16"
    stores = [(frame, audio) for audio in audio_stores for frame in frame_stores]
    width, height = (int(v) for v in args.video_size.lower().split("x"))
    raw = Path(tempfile.mkdtemp(prefix="dmgl-bench-raw-"))
    sizes: dict[str, tuple[int, int, int]] = {}  # store -> (visual bytes, audio bytes, total bytes)
    seconds: dict[str, list[float]] = {}
    cpu: dict[str, list[tuple[float, float]]] = {}  # variant -> (main process, other processes) CPU s per run
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

        def prepare(frame: str, audio: str, count: int):
            def call() -> float:
                name = f"crema-bench-{frame}-{audio}-w{count}-{next(runs)}"
                options = {"frame_store": frame, "audio_store": audio}
                main_before, others_before = tree_cpu_seconds()
                took = common.timed(
                    lambda: prepare_dataset("crema-d", raw=raw, name=name, workers=count, options=options)
                )
                main_after, others_after = tree_cpu_seconds()
                row = DatasetRegistry().get(name)
                path = Path(row["path"])
                sizes[f"{frame}, {audio}"] = (
                    common.directory_bytes(path, "visual."),
                    common.directory_bytes(path, "audio."),
                    common.directory_bytes(path),
                )
                shutil.rmtree(path, ignore_errors=True)  # ~1.8 MB per clip in the raw store: keep the disk free
                DatasetRegistry().remove(name)
                key = f"{frame}, {audio}, {count} workers"
                seconds.setdefault(key, []).append(took)
                cpu.setdefault(key, []).append((main_after - main_before, others_after - others_before))
                return clips / took

            return call

        def authors() -> float:
            out = Path(tempfile.mkdtemp(prefix="dmgl-bench-authors-"))
            try:
                main_before, others_before = tree_cpu_seconds()
                took = common.timed(lambda: authors_extraction(raw, out))
                main_after, others_after = tree_cpu_seconds()
                wavs = common.directory_bytes(raw / "AudioWAV")
                sizes[AUTHORS] = (common.directory_bytes(out), wavs, common.directory_bytes(out) + wavs)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            seconds.setdefault(AUTHORS, []).append(took)
            cpu.setdefault(AUTHORS, []).append((main_after - main_before, others_after - others_before))
            return clips / took

        # one unrecorded round first: it starts the worker server (which imports librosa and PyAV) once
        variants = {f"{f}, {a}, {w} workers": prepare(f, a, w) for w in workers for f, a in stores}
        variants[AUTHORS] = authors
        rates = common.interleave(variants, args.repeats, warmup=1)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    rows = []
    keyed = [(f, a, w, f"{f}, {a}, {w} workers") for w in workers for f, a in stores] + [("-", "-", 1, AUTHORS)]
    for f, a, w, key in keyed:
        first = rates[f"{f}, {a}, {workers[0]} workers"] if f != "-" else rates[key]
        against_raw = common.paired_ratios(rates[key], rates[f"raw, {a}, {w} workers"]) if "raw" in frame_stores else []
        # time / the authors' time, per round: the inverse ratio of the rates
        against_authors = common.paired_ratios(rates[AUTHORS], rates[key])
        recorded = cpu[key][1:]  # the warm-up round left out, as in the rates
        main_cpu = common.median([m for m, _ in recorded]) / clips
        other_cpu = common.median([o for _, o in recorded]) / clips
        authors_cpu = common.median([m + o for m, o in cpu[AUTHORS][1:]]) / clips
        wall = common.median(seconds[key][1:])
        rows.append(
            [
                key if f == "-" else f,
                a,
                w,
                common.median(rates[key]),
                wall,
                common.median(common.paired_ratios(rates[key], first)),
                common.median(against_raw) if against_raw and f != "-" else "-",
                f"{common.median(against_authors):.3f} {common.spread(against_authors)}" if f != "-" else "1",
                1e3 * main_cpu,
                1e3 * other_cpu,
                f"{(main_cpu + other_cpu) / authors_cpu:.3f}",
                (main_cpu + other_cpu) * clips / wall,
            ]
        )
    common.print_table(
        [
            "frame store",
            "audio store",
            "workers",
            "clips/s",
            "wall s",
            f"speed-up vs {workers[0]} worker(s)",
            "clips/s vs raw",
            "time / authors' (per round)",
            "CPU ms/clip: main process",
            "CPU ms/clip: workers",
            "CPU / authors'",
            "cores busy",
        ],
        rows,
        f"dmgl prepare crema-d on {clips} generated clips, 224 px frames, against the authors' frame extraction (1 fps "
        f"JPEGs at full size, one process) ({os.cpu_count()} cores here, load average {os.getloadavg()[0]:.1f} at the "
        f"end; medians of {args.repeats} rounds; CPU = user + system of this process and of the forkserver and its "
        "workers; cores busy = CPU seconds / wall seconds)",
    )
    disk = []
    jpegs, wavs, authors_total = sizes[AUTHORS]  # what the authors' loop reads: its JPEGs and the WAV files
    for f, a in stores:
        visual, audio, total = sizes[f"{f}, {a}"]
        disk.append(
            [
                f,
                a,
                visual / clips / 1e3,
                visual / clips / 10 / 1e3,
                audio / clips / 1e3,
                total / 1e6,
                total / clips / 1e3,
                total / clips * CREMA_CLIPS / 1e9,
                visual / clips * KINETICS_SOUNDS_CLIPS / 1e9,
                f"{total / authors_total:.2f}",
            ]
        )
    disk.append(
        [
            f"{AUTHORS}: JPEGs + WAVs",
            "WAV",
            jpegs / clips / 1e3,
            "-",
            wavs / clips / 1e3,
            authors_total / 1e6,
            authors_total / clips / 1e3,
            authors_total / clips * CREMA_CLIPS / 1e9,
            "-",
            "1",
        ]
    )
    common.print_table(
        [
            "frame store",
            "audio store",
            "visual kB/clip",
            "kB/frame",
            "audio kB/clip",
            "total MB",
            "total kB/clip",
            "CREMA-D 7,442 clips GB",
            "K-S 19k clips: frames GB",
            "total / authors' JPEGs + WAVs",
        ],
        disk,
        f"Prepared dataset on disk ({clips} clips, 10 frames of 224x224x3 each; MB = 10^6 bytes)",
    )


def write_faint_tones(root: Path, per_class: int, seconds: float, tone: float, noise: float) -> int:
    """CREMA-D's layout, the emotion carried only by a faint tone in loud noise (300 + 40 e Hz, amplitude ``tone``,
    white noise of std ``noise``) and every video the same grey: a task a small model gets partly right, where a
    rounding of its input could show in the accuracy."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    rate = 16_000
    time_axis = np.arange(int(seconds * rate)) / rate
    for e, emotion in enumerate(rawgen.CREMA_EMOTIONS):
        for k in range(per_class):
            clip = f"{1001 + k}_DFA_{emotion}_XX"
            wave = tone * np.sin(2 * np.pi * (300 + 40 * e) * time_axis + rng.uniform(0, 2 * np.pi))
            wave = np.clip(wave + rng.normal(0, noise, time_axis.size), -1, 1).astype(np.float32)
            (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
            soundfile.write(root / "AudioWAV" / f"{clip}.wav", wave, rate, subtype="PCM_16")
            rawgen.write_video(root / "VideoFlash" / f"{clip}.flv", 12, (128, 128, 128))
    return per_class * len(rawgen.CREMA_EMOTIONS)


def audio_dtype_section(args) -> None:
    """``-o audio_dtype=float16`` against float32: bytes on disk, the rounding, and the accuracy of a small model
    trained on each (same seeds, so paired), and of the float32-trained model scored on the float16 inputs."""
    import numpy as np
    import torch

    from dmgl_cli.data.loader import eval_loader
    from dmgl_cli.data.registry import DatasetRegistry
    from dmgl_cli.prepare import prepare_dataset
    from dmgl_cli.train import Trainer, evaluate

    raw = Path(tempfile.mkdtemp(prefix="dmgl-bench-tones-"))
    try:
        clips = write_faint_tones(raw, args.dtype_clips_per_class, args.dtype_seconds, args.tone, args.noise)
        names = {}
        for dtype in ("float32", "float16"):
            names[dtype] = f"tones-{args.tone}-{dtype}"
            if names[dtype] not in {r["name"] for r in DatasetRegistry().rows()}:
                options = {
                    "audio_store": "spectrogram",
                    "audio_dtype": dtype,
                    "frame_size": 32,
                    "test_fraction": 0.3,
                    "frame_store": "raw",
                }
                prepare_dataset("crema-d", raw=raw, name=names[dtype], workers=1, options=options)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    datasets = {dtype: common.open_dataset(name) for dtype, name in names.items()}
    audio_bytes = {
        dtype: sum(p.stat().st_size for p in dataset.path.rglob("audio.npy")) for dtype, dataset in datasets.items()
    }
    total_bytes = {dtype: common.directory_bytes(dataset.path) for dtype, dataset in datasets.items()}
    wide = np.concatenate([np.asarray(datasets["float32"].split(s).inputs["audio"]).ravel() for s in ("train", "test")])
    narrow = np.concatenate(
        [np.asarray(datasets["float16"].split(s).inputs["audio"]).astype(np.float32).ravel() for s in ("train", "test")]
    )
    error = np.abs(narrow - wide)
    common.print_table(
        ["audio_dtype", "audio kB/clip", "dataset kB/clip", "CREMA-D 7,442 clips: audio GB"],
        [
            [d, audio_bytes[d] / clips / 1e3, total_bytes[d] / clips / 1e3, audio_bytes[d] / clips * CREMA_CLIPS / 1e9]
            for d in datasets
        ],
        f"Spectrograms on disk ({clips} raw clips of {args.dtype_seconds} s, repeated to the preparer's 3 s: "
        "257 x 299, 307 kB a clip in float32). "
        f"float16 rounding of the log-magnitudes: max {error.max():.2e}, mean {error.mean():.2e}, against a spread "
        f"(std) of {wide.std():.2f}",
    )

    overrides = [*common.crema_overrides("tones", "resnet18", 4, 16, sampled_frames=3), f"optim.lr={args.dtype_lr}"]
    rows, paired = [], []
    on: dict[str, dict[str, float]] = {}
    for seed in range(args.dtype_first_seed, args.dtype_first_seed + args.dtype_seeds):
        accuracies = {}
        for dtype, dataset in datasets.items():
            config = common.load(
                "crema-d",
                [
                    *overrides,
                    f"dataset={names[dtype]}",
                    f"train.epochs={args.dtype_epochs}",
                    "train.device=cpu",
                    "strategy.name=constant",
                    "strategy.alpha=0",
                ],
            )
            trainer = Trainer(config, dataset, seed, common.MemorySink())
            result = trainer.fit()
            accuracies[dtype] = result.final["test_acc"]
            if dtype == "float32":  # the same (last-epoch) weights scored on both inputs: the rounding alone
                on = {
                    d: evaluate(
                        trainer.model,
                        trainer.method,
                        config,
                        eval_loader(ds, config, "test"),
                        torch.device("cpu"),
                        "test",
                    )
                    for d, ds in datasets.items()
                }
        paired.append(accuracies["float16"] - accuracies["float32"])
        rows.append(
            [
                seed,
                accuracies["float32"],
                accuracies["float16"],
                accuracies["float16"] - accuracies["float32"],
                on["float32"]["test_acc"],
                on["float16"]["test_acc"],
                abs(on["float16"]["test_cls_loss"] - on["float32"]["test_cls_loss"]),
            ]
        )
    rows.append(["mean", *(float(np.mean([r[i] for r in rows])) for i in range(1, 7))])
    common.print_table(
        [
            "seed",
            "test ACC float32",
            "test ACC float16",
            "difference",
            "f32 model: ACC on f32",
            "ACC on f16",
            "|test loss difference|",
        ],
        rows,
        f"Concat (alpha 0), ResNet18 width 4 x 2, {args.dtype_epochs} epochs, trained on each dtype with the same "
        f"seed; test = 30% of {clips} clips (the best epoch on validation; the right columns: the last epoch's "
        "float32-trained weights on both inputs)",
    )
    print(f"paired differences float16 - float32: {', '.join(f'{d:+.4f}' for d in paired)}")


def audio_read_section(args) -> None:
    """What a loader worker pays to read a batch of CREMA-D audio from each store: the float32 spectrograms copied
    out of the memory map, or computed from the int16 samples (data/pcm_audio.py). Process CPU time per clip, the
    files in the page cache (as in training after the first epoch), batches of ``--read-batch`` random rows."""
    import numpy as np

    from dmgl_cli.data.loader import gather_rows
    from dmgl_cli.data.media import clip_samples, log_magnitude, to_pcm16
    from dmgl_cli.data.pcm_audio import PcmSpectrograms, pcm_path

    clips, seconds = args.read_clips, 3.0
    rng = np.random.default_rng(0)
    length = clip_samples(seconds)
    folder = Path(tempfile.mkdtemp(prefix="dmgl-bench-audio-read-"))
    try:
        time_axis = np.arange(length) / 16_000
        waves = [0.3 * np.sin(2 * np.pi * (200 + k) * time_axis) + rng.normal(0, 0.05, length) for k in range(clips)]
        pcm = np.stack([to_pcm16(np.clip(w, -1, 1)) for w in waves])
        np.save(pcm_path(folder, "audio"), pcm)
        np.save(folder / "audio.npy", np.stack([log_magnitude(p.astype(np.float32) / 32768) for p in pcm]))
        shape = (257, 1 + (length - 512) // 159)
        stores = {
            "spectrogram (float32 .npy)": np.load(folder / "audio.npy", mmap_mode="r"),
            "pcm16 (STFT when read)": PcmSpectrograms(folder, "audio", shape, "float32", length),
        }
        batches = [rng.choice(clips, args.read_batch, replace=False) for _ in range(args.read_batches)]

        def reader(store):
            def call() -> float:
                started = time.process_time()
                for rows in batches:
                    gather_rows(store, rows)
                return (time.process_time() - started) / (len(batches) * args.read_batch)

            return call

        seconds_per_clip = common.interleave({name: reader(store) for name, store in stores.items()}, args.repeats)
        pcm_kb = pcm.nbytes / clips / 1e3
        spectrogram_kb = np.load(folder / "audio.npy", mmap_mode="r").nbytes / clips / 1e3
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    common.print_table(
        ["audio store", "CPU ms/clip (median)", "rounds", "kB/clip on disk"],
        [
            [name, 1e3 * common.median(values), " ".join(f"{1e3 * v:.3f}" for v in values), kb]
            for (name, values), kb in zip(seconds_per_clip.items(), (spectrogram_kb, pcm_kb), strict=True)
        ],
        f"Reading CREMA-D audio (257 x {shape[1]}) in batches of {args.read_batch} random rows of {clips} clips, "
        f"{args.read_batches} batches a round, one process (load average {os.getloadavg()[0]:.1f})",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sections", default="workers,audio-dtype", help="comma-separated: workers, audio-dtype, audio-read"
    )
    parser.add_argument("--clips-per-class", type=int, default=10, help="6 classes: 10 -> 60 clips")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument(
        "--frame-stores", default="raw,jpeg", help="comma-separated: raw (uint8 arrays), jpeg (-o frame_store=jpeg)"
    )
    parser.add_argument(
        "--audio-stores",
        default="pcm16",
        help="comma-separated: pcm16 (the default, 16-bit samples), spectrogram (-o audio_store=spectrogram)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--video-size", default="480x360", help="raw FLV frame size (CREMA-D: 480x360)")
    parser.add_argument("--seconds", type=float, default=2.5, help="clip length (CREMA-D: ~2.5 s)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--content", default="texture", choices=["texture", "flat"], help="what the videos show")
    parser.add_argument("--dtype-clips-per-class", type=int, default=40, help="audio-dtype: clips of each emotion")
    parser.add_argument("--dtype-seconds", type=float, default=1.5, help="audio-dtype: clip length")
    parser.add_argument("--dtype-seeds", type=int, default=3)
    parser.add_argument("--dtype-first-seed", type=int, default=0)
    parser.add_argument("--dtype-epochs", type=int, default=8)
    parser.add_argument("--dtype-lr", type=float, default=0.05, help="audio-dtype: SGD's learning rate")
    parser.add_argument("--tone", type=float, default=0.05, help="audio-dtype: the class tone's amplitude")
    parser.add_argument("--noise", type=float, default=0.2, help="audio-dtype: the noise's std")
    parser.add_argument("--read-clips", type=int, default=200, help="audio-read: clips in the stores")
    parser.add_argument("--read-batch", type=int, default=16, help="audio-read: rows a batch")
    parser.add_argument("--read-batches", type=int, default=20, help="audio-read: batches a round")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - {"workers", "audio-dtype", "audio-read"}:
        parser.error("--sections: choose from workers, audio-dtype, audio-read")

    global common
    import common  # noqa: F811 (the module-level placeholder above: see there why not at the top)

    common.use_private_registry()
    print(f"prepare: {common.machine_line()}")
    print(f"note: {common.INTERLEAVE_NOTE}")
    if "workers" in sections:
        workers_section(args, parser)
    if "audio-dtype" in sections:
        audio_dtype_section(args)
    if "audio-read" in sections:
        audio_read_section(args)


if __name__ == "__main__":
    main()
