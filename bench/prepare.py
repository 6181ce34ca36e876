"""``dmgl prepare crema-d`` throughput: clips/s with 1 and 2 (or more) worker processes, on generated raw files.

The raw fixture is CREMA-D's public layout in its real formats (``AudioWAV/*.wav`` 16 kHz PCM, ``VideoFlash/*.flv``
FLV1 video), written with tests/rawgen.py's writers at the real clips' size by default: 480x360 at 30 fps, about
2.5 s. Every worker count prepares the same clips into its own dataset, interleaved (1 2 1 2 ...); clips/s counts
the whole ``prepare_dataset`` call (decoding, writing the arrays, checksums, the manifest). Should scale with the
workers as far as the cores allow.

    python bench/prepare.py                      # 60 clips, workers 1 and 2
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


def write_raw(root: Path, per_class: int, width: int, height: int, seconds: float, fps: int) -> int:
    """CREMA-D's layout, one WAV + one FLV per clip, ``per_class`` clips of each emotion."""
    count = 0
    for e, emotion in enumerate(rawgen.CREMA_EMOTIONS):
        for k in range(per_class):
            clip = f"{1001 + k}_DFA_{emotion}_XX"
            rawgen.write_wav(root / "AudioWAV" / f"{clip}.wav", seconds, 200 + 100 * e)
            rawgen.write_video(
                root / "VideoFlash" / f"{clip}.flv",
                int(seconds * fps),
                rawgen.COLOURS[e],
                width=width,
                height=height,
                fps=fps,
            )
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips-per-class", type=int, default=10, help="6 classes: 10 -> 60 clips")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--video-size", default="480x360", help="raw FLV frame size (CREMA-D: 480x360)")
    parser.add_argument("--seconds", type=float, default=2.5, help="clip length (CREMA-D: ~2.5 s)")
    parser.add_argument("--fps", type=int, default=30)
    args = parser.parse_args()

    common.use_private_registry()
    from dmgl_cli.data.registry import DatasetRegistry
    from dmgl_cli.prepare import prepare_dataset

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    width, height = (int(v) for v in args.video_size.lower().split("x"))
    print(f"prepare: {common.machine_line()}")
    print(f"note: {common.INTERLEAVE_NOTE}")
    raw = Path(tempfile.mkdtemp(prefix="dmgl-bench-raw-"))
    try:
        started = time.perf_counter()
        clips = write_raw(raw, args.clips_per_class, width, height, args.seconds, args.fps)
        print(
            f"raw fixture: {clips} clips ({width}x{height} FLV at {args.fps} fps, {args.seconds} s; WAV 16 kHz) "
            f"written in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        runs = iter(range(1_000_000))

        def prepare(count: int):
            def call() -> float:
                name = f"crema-bench-w{count}-{next(runs)}"
                seconds = common.timed(lambda: prepare_dataset("crema-d", raw=raw, name=name, workers=count))
                row = DatasetRegistry().get(name)
                shutil.rmtree(row["path"], ignore_errors=True)  # ~1.8 MB per clip: keep the disk free
                DatasetRegistry().remove(name)
                return clips / seconds

            return call

        # one unrecorded round first: it starts the worker server (which imports librosa and PyAV) once
        rates = common.interleave({f"{w} workers": prepare(w) for w in workers}, args.repeats, warmup=1)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    base = rates[f"{workers[0]} workers"]
    rows = []
    for w in workers:
        speedup = common.paired_ratios(rates[f"{w} workers"], base)
        rows.append(
            [
                w,
                common.median(rates[f"{w} workers"]),
                common.median(speedup),
                common.spread(speedup),
                f"{common.median(speedup) / (w / workers[0]):.0%}",
            ]
        )
    common.print_table(
        ["workers", "clips/s", f"speed-up vs {workers[0]}", "per-round range", "scaling efficiency"],
        rows,
        f"dmgl prepare crema-d on {clips} generated clips (should scale with the workers, up to "
        f"the {os.cpu_count()} cores here)",
    )


if __name__ == "__main__":
    main()
