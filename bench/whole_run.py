"""The whole ``dmgl train`` command, as a user runs it, against the published OGM-GE-style loop's whole run.

Both at the input shapes of ``vs_reference_loop.py --cases whole-run`` (ResNet18 x 2 at width 64, a 257 x 188
spectrogram, 1 or 3 frames of 224 px, SGD, constant alpha 0.5, the same batch size, torch threads and loader
workers), each a process of its own, alternating (published, dmgl, published, dmgl ...):

* dmgl: the real command, ``dmgl train --recipe crema-d --set ...`` (the console script: process start, imports,
  the MLflow store and runs, training with validation every epoch and test at each new best, checkpoints, the
  logged model, the run summary, the exit), its stderr on a pseudo-terminal so that it draws its progress bar as in
  a terminal; the bar's first drawing marks the end of the first training step, its last the end of the last one.
  The training seconds of each epoch are read back from the recorded run (``train/epoch_seconds``);
* published: ``vs_reference_loop.py``'s published loop, which prints the wall-clock times of its first and last
  steps and its training seconds per epoch; the time it spends writing its JPEG and WAV files is left out;
* with ``--authors-checkout PATH``, the authors' own code (``authors_loop.py``: their dataset, model, ``train_epoch``
  and ``valid`` imported from a checkout of their repository), timed as the published loop is: the check that the
  published loop stands for theirs, in the same rounds.

Per run: start-up (process start -> end of the first step; that step's seconds are also in the training seconds),
exit (end of the last step -> process gone: the last epoch's evaluation and everything after it), time outside
training (whole run - training seconds of all epochs: start-up, evaluation, checkpoints, exit), the whole run, and
the peak PSS and RSS of the process tree (DataLoader workers included), sampled every 0.2 s.

    python bench/whole_run.py                                         # 1 frame, 2 epochs, 2 rounds, ~10 min on 2 CPUs
    python bench/whole_run.py --frames 3 --repeats 1
    python bench/whole_run.py --samples 64 --test 32 --batch-size 16 --repeats 2    # the README's figures, ~9 min
    python bench/whole_run.py --authors-checkout ~/OGM-GE_CVPR2022    # + the authors' own loop (authors_loop.py)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import vs_reference_loop  # noqa: E402

STARTUP_TARGET_S = 3.0
EXIT_TARGET_S = 3.0
TIME_TARGET = 0.7  # whole dmgl run / whole published run, issue 26
MEMORY_TARGET = 0.85
DMGL = Path(sys.executable).with_name("dmgl")
BAR_ONLY = re.compile(rb"^[\s\r\x1b\[\]0-9;ADKm]*$")  # a chunk that only moves or clears the cursor (tqdm's close)


def reference_args(args) -> argparse.Namespace:
    """``vs_reference_loop.py``'s arguments for the same whole run."""
    return argparse.Namespace(
        batch_size=args.batch_size,
        whole_run_frames=args.frames,
        whole_run_epochs=args.epochs,
        whole_run_samples=args.samples,
        whole_run_test=args.test,
        device=args.device,
        workers=args.workers,
        frame_store=args.frame_store,
    )


class StreamClock:
    """Reads a file descriptor in a thread until it closes, keeping each chunk with the time it arrived."""

    def __init__(self, fd: int):
        self.fd, self.chunks = fd, []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the pseudo-terminal's other side is closed
                return
            if not data:
                return
            self.chunks.append((time.time(), data))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def first(self, needle: bytes) -> float | None:
        return next((t for t, data in self.chunks if needle in data), None)

    def last_bar_time(self, needle: bytes) -> float | None:
        """The time of the last chunk of the bar that first showed ``needle``: the bar's drawings and its close."""
        start = next((i for i, (_, data) in enumerate(self.chunks) if needle in data), None)
        if start is None:
            return None
        last = self.chunks[start][0]
        for moment, data in self.chunks[start + 1 :]:
            if needle in data or BAR_ONLY.match(data):
                last = moment
            else:
                break
        return last

    def text(self) -> str:
        return b"".join(data for _, data in self.chunks).decode(errors="replace")


def dmgl_run(args) -> dict[str, float]:
    """One ``dmgl train`` command: its timings and peak memory."""
    overrides = vs_reference_loop._whole_run_overrides(reference_args(args))
    command = [str(DMGL), "train", "--recipe", "crema-d", "--name", "whole-run-bench", "--json"]
    for override in overrides:
        command += ["--set", override]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TERM=os.environ.get("TERM", "xterm"))
    if env["TERM"] == "dumb":
        env["TERM"] = "xterm"
    controller, terminal = pty.openpty()
    # a terminal of 0 columns (a new pseudo-terminal's size) would have tqdm draw nothing
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=terminal, env=env, start_new_session=True)
    os.close(terminal)
    clock = StreamClock(controller)
    output, watch = watched(process, args.timeout, "dmgl train")
    ended = time.time()
    clock.join(5.0)
    os.close(controller)
    if process.returncode != 0:
        raise SystemExit(f"dmgl train failed (exit {process.returncode}):\n{clock.text()[-3000:]}")
    first = clock.first(b"epoch 1")
    last = clock.last_bar_time(f"epoch {args.epochs}".encode())
    if first is None or last is None:
        raise SystemExit(f"dmgl train drew no progress bar on its terminal:\n{clock.text()[-2000:]}")
    outcome = json.loads(output)
    from dmgl_cli.tracking import Tracker

    epoch_seconds = [v for _, v in Tracker().metric_history(outcome["seeds"][0]["run_id"], "epoch_seconds")]
    return figures(started, first, last, ended, epoch_seconds, watch)


def watched(process: subprocess.Popen, timeout: float, what: str):
    """``process``'s stdout once it ends, and the memory watch of its process tree; killed (the whole group) and an
    error past ``timeout`` seconds."""
    with common.MemoryWatch(process.pid, interval=0.2) as watch:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            raise SystemExit(f"{what} ran past --timeout {timeout} s") from None
    return output, watch


def published_run(args, child: str = "published") -> dict[str, float]:
    """One whole run of the published loop (``vs_reference_loop.py``'s child), or with ``child="authors"`` of the
    authors' own code (``authors_loop.py``): its timings and peak memory."""
    ref = reference_args(args)
    command = [sys.executable, str(Path(vs_reference_loop.__file__)), "--threads", str(args.threads)]
    command += ["--workers", str(args.workers), "--batch-size", str(args.batch_size), "--device", args.device]
    command += ["--frame-store", args.frame_store, "--whole-run-samples", str(ref.whole_run_samples)]
    command += ["--whole-run-epochs", str(args.epochs), "--whole-run-frames", str(args.frames)]
    command += ["--whole-run-test", str(args.test), "--whole-run-child", child]
    if child == "authors":
        command += ["--authors-checkout", str(args.authors_checkout)]
    what = "the published loop" if child == "published" else "the authors' loop"
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    output, watch = watched(process, args.timeout, what)
    ended = time.time()
    if process.returncode != 0:
        raise SystemExit(f"{what} failed (exit {process.returncode})")
    found = json.loads(output.split("WHOLE ", 1)[1])
    marks = found["marks"]
    writing = marks["files_end"] - marks["files_start"]  # its own files, which dmgl's prepare replaces: not counted
    return figures(
        started + writing, marks["first_step_end"], marks["last_step_end"], ended, found["epoch_seconds"], watch
    )


def figures(started, first_step_end, last_step_end, ended, epoch_seconds, watch) -> dict[str, float]:
    whole = ended - started
    startup, exit_seconds = first_step_end - started, ended - last_step_end
    return {
        "whole": whole,
        "startup": startup,
        "exit": exit_seconds,
        "outside": whole - sum(epoch_seconds),
        "training": sum(epoch_seconds),
        "pss": watch.peak_pss,
        "rss": watch.peak_rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1, help="frames per sample (1 or 3)")
    parser.add_argument("--samples", type=int, default=128, help="training samples written (dmgl carves 10%%)")
    parser.add_argument("--test", type=int, default=64, help="test samples written")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both loops")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, both loops")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (published, dmgl)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--frame-store", default="jpeg", help="dmgl's frame store, raw | jpeg")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument(
        "--authors-checkout",
        type=Path,
        help="a checkout of GeWu-Lab/OGM-GE_CVPR2022: also run the authors' own loop each round (authors_loop.py)",
    )
    args = parser.parse_args()
    if args.authors_checkout:
        import authors_loop

        args.authors_checkout = authors_loop.check_checkout(args.authors_checkout)

    common.use_private_registry()
    common.set_threads(args.threads)
    print(f"whole_run: {common.machine_line()}")
    ref = reference_args(args)
    common.write_crema_shaped(
        vs_reference_loop._whole_run_dataset_name(ref),
        args.samples,
        args.test,
        audio_shape=vs_reference_loop.PUBLISHED_SPECTROGRAM,
        frame_store=args.frame_store,
    )
    runs = {"published": published_run, "dmgl": dmgl_run}
    if args.authors_checkout:
        runs["authors' code"] = lambda args: published_run(args, "authors")
    measured: dict[str, list[dict[str, float]]] = {which: [] for which in runs}
    for round_number in range(args.repeats):
        for which, run in runs.items():
            load = os.getloadavg()[0]
            measured[which].append(run(args))
            got = measured[which][-1]
            print(
                f"  [round {round_number + 1}/{args.repeats}] {which}: whole {got['whole']:.1f} s, start-up "
                f"{got['startup']:.2f} s, exit {got['exit']:.2f} s, outside training {got['outside']:.1f} s, peak "
                f"PSS {common.gigabytes(got['pss']):.2f} GB (load average {load:.1f} at its start)",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for which, found in measured.items():

        def mid(key: str, found=found) -> float:
            return common.median([f[key] for f in found])

        row = [which, mid("whole"), mid("startup"), mid("exit"), mid("outside"), mid("training")]
        row += [common.gigabytes(max(f["pss"] for f in found)), common.gigabytes(max(f["rss"] for f in found))]
        if which == "dmgl":
            ratios = common.paired_ratios([f["whole"] for f in found], [f["whole"] for f in measured["published"]])
            pss_ratio = max(f["pss"] for f in found) / max(f["pss"] for f in measured["published"])
            row += [
                f"{common.median(ratios):.3f} {common.spread(ratios)}",
                f"{pss_ratio:.3f}",
                f"whole <= {TIME_TARGET:g} {common.verdict(common.median(ratios), TIME_TARGET, True)}, PSS <= "
                f"{MEMORY_TARGET:g} {common.verdict(pss_ratio, MEMORY_TARGET, True)}, start-up <= "
                f"{STARTUP_TARGET_S:g} s {common.verdict(mid('startup'), STARTUP_TARGET_S, True)}, exit <= "
                f"{EXIT_TARGET_S:g} s {common.verdict(mid('exit'), EXIT_TARGET_S, True)}",
            ]
        elif which == "authors' code":
            # the check of the reference: the published loop's whole run over the authors' own, round by round
            ratios = common.paired_ratios([f["whole"] for f in measured["published"]], [f["whole"] for f in found])
            dmgl = common.paired_ratios([f["whole"] for f in measured["dmgl"]], [f["whole"] for f in found])
            row += [
                f"published / authors' {common.median(ratios):.3f} {common.spread(ratios)}; dmgl / authors' "
                f"{common.median(dmgl):.3f} {common.spread(dmgl)}",
                f"{max(f['pss'] for f in measured['dmgl']) / max(f['pss'] for f in found):.3f} (dmgl / authors')",
                "",
            ]
        else:
            row += ["", "", ""]
        rows.append(row)
    common.print_table(
        [
            "loop",
            "whole s",
            "start-up s",
            "exit s",
            "outside training s",
            "training s",
            "peak PSS GB",
            "peak RSS GB",
            "dmgl / published whole",
            "dmgl / published PSS",
            "targets",
        ],
        rows,
        f"Whole run, {args.frames} frame(s), {args.epochs} epochs, batch {args.batch_size}, {args.threads} threads, "
        f"{args.workers} workers, {args.samples} train / {args.test} test (medians over {args.repeats} rounds)",
    )


if __name__ == "__main__":
    main()
