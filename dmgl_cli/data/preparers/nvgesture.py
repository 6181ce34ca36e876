"""NVGesture (Molchanov et al. 2016): 25 hand gestures; RGB, depth and optical flow (§4.1: 1,050 train / 482 test).

Raw layout (NVIDIA's distribution)::

    <raw>/nvgesture_train_correct_cvpr2016_v2.lst
    <raw>/nvgesture_test_correct_cvpr2016_v2.lst
    <raw>/Video_data/class_01/subject13_r0/sk_color.avi
    <raw>/Video_data/class_01/subject13_r0/sk_depth.avi
    ...

A list line reads ``path:./Video_data/class_01/subject13_r0 depth:sk_depth:START:END color:sk_color:START:END
duo_left:duo_left:START:END label:K`` with K from 1 to 25 (stored as K - 1). The gesture is frames
``[START, END)`` of each video, as NVIDIA's own reader takes them; depth is the first channel of the decoded
depth video, as there.

Stored per sample (``frames`` = 32 spread evenly over the gesture, ``frame_size`` = 112 square):

* ``rgb``   uint8 [32, 112, 112, 3];
* ``depth`` uint8 [32, 112, 112, 1];
* ``flow``  uint8 [32, 112, 112, 2] — optical flow computed at prepare time with OpenCV's Farnebäck algorithm
  (``cv2.calcOpticalFlowFarneback``: pyramid scale 0.5, 3 levels, window 15, 3 iterations, poly_n 5, sigma 1.2)
  between each kept colour frame and the next one (the previous one for a gesture's last frame), on the native
  320 x 240 grey frames; the field is resized to the stored size with the vectors scaled alike, clipped to
  ±``flow_bound`` (20) pixels and mapped linearly to 0..255 (128 = no motion), the usual I3D convention.

Why 32 x 112 x 112: torchvision's video ResNets are built for 112 x 112 inputs (16 frames); 32 frames keep
most of an 80-frame gesture. The three modalities take 32·112·112·6 bytes = 2.4 MB a sample, 3.7 GB for all
1,532 — the lineage's 80 x 224 x 224 would be 37 GB — and a batch of 16 of the three r3d_18 networks trains in
the memory of a 24 GB GPU. Both are options (``-o frames=``, ``-o frame_size=``). There is no validation split:
the trainer carves one from train.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from dmgl_cli.data.media import BadSample, count_frames, decode_frames, even_indices
from dmgl_cli.data.preparers import driver
from dmgl_cli.data.preparers.base import PrepareJob
from dmgl_cli.data.preparers.common import (
    check_layout,
    positive_float,
    positive_int,
    raw_folder,
    read_text_file,
    reject,
)
from dmgl_cli.errors import DmglError

NAME = "nvgesture"
VERSION = "1"
DESCRIPTION = "NVGesture: 25 gestures, RGB + depth + optical flow clips (32 x 112 x 112); 1,050 train / 482 test"
LISTS = {"train": "nvgesture_train_correct_cvpr2016_v2.lst", "test": "nvgesture_test_correct_cvpr2016_v2.lst"}
CLASSES = [f"gesture{k:02d}" for k in range(1, 26)]
OPTIONS = {
    "frames": 32,  # spread evenly over the gesture's [START, END)
    "frame_size": 112,
    "flow_bound": 20.0,  # flow clipped to +-bound pixels (at the stored size) before mapping to uint8
    "frame_store": "raw",  # raw (uint8 .npy) | jpeg (decoded per batch, only the sampled frames; bench/README.md)
    "frame_quality": 90,  # JPEG quality of frame_store=jpeg
}
LAYOUT = """  nvgesture_train_correct_cvpr2016_v2.lst
  nvgesture_test_correct_cvpr2016_v2.lst
      lines: path:./Video_data/class_01/subject13_r0 depth:sk_depth:START:END color:sk_color:START:END
             duo_left:duo_left:START:END label:K
  Video_data/class_01/subject13_r0/sk_color.avi, sk_depth.avi ..."""
_RANGE = re.compile(r"^(\w+):(\d+):(\d+)$")
FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2, "flags": 0}


def parse_line(line: str) -> tuple[str, tuple[int, int], tuple[int, int], int]:
    """(relative folder, colour range, depth range, 0-based label); ValueError with the reason if malformed."""
    fields: dict[str, str] = {}
    for token in line.split():
        key, _, value = token.partition(":")
        fields[key] = value
    missing = [k for k in ("path", "color", "depth", "label") if k not in fields]
    if missing:
        raise ValueError(
            f"has no {', '.join(missing)} field (expected path:... depth:sk_depth:START:END "
            "color:sk_color:START:END ... label:K)"
        )
    ranges = {}
    for sensor, stem in (("color", "sk_color"), ("depth", "sk_depth")):
        match = _RANGE.match(fields[sensor])
        if not match or match.group(1) != stem:
            raise ValueError(f"has {sensor}:{fields[sensor]}, expected {sensor}:{stem}:START:END")
        start, end = int(match.group(2)), int(match.group(3))
        if end <= start:
            raise ValueError(f"has an empty {sensor} range [{start}, {end})")
        ranges[sensor] = (start, end)
    if not fields["label"].isdigit() or not 1 <= int(fields["label"]) <= len(CLASSES):
        raise ValueError(f"has label:{fields['label']}, expected 1..{len(CLASSES)}")
    folder = fields["path"]
    parts = Path(folder).parts
    if not folder or Path(folder).is_absolute() or ".." in parts:
        raise ValueError(f"has path:{folder}, not a folder inside the download")
    return folder, ranges["color"], ranges["depth"], int(fields["label"]) - 1


def _frames_at(
    path: str, start: int, end: int, wanted: int, convert
) -> tuple[list[int], list[int], dict[int, np.ndarray]]:
    """Evenly spread indices over [start, end) (capped at the frames the file has), each one's flow partner (the
    next frame, or the previous one at the end), and the decoded frames at all of them."""
    total = count_frames(path)
    for _attempt in range(2):
        stop = min(end, total)
        available = stop - start
        if available < max(wanted, 2):
            raise BadSample(
                path,
                f"has {max(available, 0)} video frames in its range [{start}, {end}), fewer than "
                f"the {max(wanted, 2)} requested",
            )
        picks = even_indices(available, wanted, start)
        partners = [p + 1 if p + 1 < stop else p - 1 for p in picks]
        found, decoded = decode_frames(path, sorted(set(picks + partners)), convert)
        if len(found) == len(set(picks + partners)):
            return picks, partners, found
        total = decoded
    raise BadSample(path, "frames could not be decoded consistently")


def _flow(first: np.ndarray, second: np.ndarray, size: int, bound: float) -> np.ndarray:
    import cv2

    height, width = first.shape[:2]
    # OpenCV's stubs make the output array `flow` required; None (the documented usage) has cv2 allocate it.
    flow = cv2.calcOpticalFlowFarneback(first, second, None, **FARNEBACK)  # pyright: ignore[reportCallIssue, reportArgumentType]
    flow = cv2.resize(flow, (size, size), interpolation=cv2.INTER_AREA)
    flow[..., 0] *= size / width
    flow[..., 1] *= size / height
    scaled = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2 * bound))
    return np.rint(scaled).astype(np.uint8)


def decode_gesture(
    source: tuple[str, tuple[int, int], str, tuple[int, int]], *, frames: int, size: int, bound: float
) -> dict[str, np.ndarray]:
    import cv2

    colour, (c_start, c_end), depth, (d_start, d_end) = source
    for path in (colour, depth):
        if not Path(path).is_file():
            raise BadSample(path, "is missing")
    picks, partners, rgb_frames = _frames_at(colour, c_start, c_end, frames, lambda f: f.to_ndarray(format="rgb24"))
    grey = {i: cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for i, f in rgb_frames.items()}
    rgb = np.stack([cv2.resize(rgb_frames[p], (size, size), interpolation=cv2.INTER_AREA) for p in picks])
    # Motion from each kept frame to the next (or from the previous one into the gesture's last frame).
    flow = np.stack(
        [_flow(grey[min(p, q)], grey[max(p, q)], size, bound) for p, q in zip(picks, partners, strict=True)]
    )
    d_picks, _, depth_frames = _frames_at(depth, d_start, d_end, frames, lambda f: f.to_ndarray(format="rgb24")[..., 0])
    depth_out = np.stack([cv2.resize(depth_frames[p], (size, size), interpolation=cv2.INTER_AREA) for p in d_picks])
    return {"rgb": rgb, "depth": depth_out[..., None], "flow": flow}


def prepare(job: PrepareJob) -> dict[str, Any]:
    raw = raw_folder(job, NAME, LAYOUT)
    check_layout(raw, [*LISTS.values(), "Video_data/"], NAME, LAYOUT)
    frames = positive_int(job, "frames")
    size = positive_int(job, "frame_size", 16)
    bound = positive_float(job, "flow_bound")
    samples: list[driver.Sample] = []
    known_bad: list[dict[str, Any]] = []
    for split, name in LISTS.items():
        index = 0
        for number, line in enumerate(read_text_file(raw / name).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                folder, colour, depth, label = parse_line(line)
            except ValueError as exc:
                reject(
                    job,
                    known_bad,
                    split=split,
                    ident=f"{name}:{number}",
                    path=f"{raw / name}:{number}",
                    reason=str(exc),
                )
                continue
            base = raw / folder
            source = (str(base / "sk_color.avi"), colour, str(base / "sk_depth.avi"), depth)
            samples.append(driver.Sample(split, index, label, Path(folder).as_posix().removeprefix("./"), source))
            index += 1
    if not samples:
        raise DmglError(f"the NVGesture lists under {raw} name no samples")
    plan = driver.Plan(
        samples=samples,
        classes=CLASSES,
        decoded={
            "rgb": driver.Modality(
                "video", (frames, size, size, 3), "uint8", **driver.frame_store(job, "video", (frames, size, size, 3))
            ),
            "depth": driver.Modality(
                "video", (frames, size, size, 1), "uint8", **driver.frame_store(job, "video", (frames, size, size, 1))
            ),
            "flow": driver.Modality("video", (frames, size, size, 2), "uint8"),
        },
        decode=functools.partial(decode_gesture, frames=frames, size=size, bound=bound),
        known_bad=known_bad,
        extra={
            "optical_flow": {
                "algorithm": "opencv farneback",
                **FARNEBACK,
                "bound": bound,
                "encoding": "uint8 = (clip(flow, -bound, bound) + bound) * 255 / (2 bound)",
            }
        },
    )
    return driver.run(job, plan, preparer=NAME, version=VERSION)
