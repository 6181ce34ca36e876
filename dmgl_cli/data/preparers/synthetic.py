"""The built-in synthetic dataset: the demo and the test bed, built to carry modality imbalance.

Eight classes, two (or three) vector modalities, complementary by construction:

* ``fast`` (32-d) shows mostly *which pair* of classes a sample belongs to (classes 2k and 2k+1 share a large
  mean), with only a weak hint of the class inside the pair. Its inputs are at unit scale, so an MLP fits it fast.
* ``slow`` (32-d) tells all eight classes apart about as well as ``fast`` alone tells them, but its inputs are
  scaled down (x0.2), so its encoder's gradients are small and it learns slowly.
* ``mid`` (optional third, 32-d) carries a noisy class signal at an intermediate scale.

Fused accuracy needs both: ``fast`` settles the pair, ``slow`` the class inside it. Under plain Concat (alpha = 0)
the fast modality drives the training loss down first and the slow one is left under-trained, and that costs fused
accuracy. Measured with ``bench/imbalance.py`` (defaults, see the README for the latest figures): the slow modality
alone reaches ~0.73 test accuracy, inside Concat only ~0.3, and fused accuracy moves with it.

Generation is seeded; splits: train / test (no validation split — the trainer carves one from train, stratified
and seeded, as it does for CREMA-D).
"""

from __future__ import annotations

import numpy as np

from dmgl_cli.data.prepared import PreparedWriter
from dmgl_cli.data.preparers.base import PrepareJob
from dmgl_cli.errors import DmglError

NAME = "synthetic"
VERSION = "1"
DESCRIPTION = "seeded imbalanced toy data (8 classes; fast + slow [+ mid] vector modalities); no raw files needed"
OPTIONS = {
    "samples": 2400,  # total; 3/4 train, 1/4 test
    "modalities": 2,  # 2 (fast, slow) or 3 (+ mid)
    "classes": 8,  # even: classes come in pairs that the fast modality confuses
    "dim": 32,
    "fast_pair_signal": 1.5,  # mean separation between pairs in the fast modality
    "fast_class_signal": 0.2,  # separation inside a pair in the fast modality (weak)
    "slow_class_signal": 0.4,  # separation of all classes in the slow modality
    "slow_scale": 0.2,  # input scale of the slow modality: small inputs, small gradients, slow learning
}


def generate(
    seed: int,
    samples: int,
    modalities: int,
    classes: int,
    dim: int,
    fast_pair_signal: float,
    fast_class_signal: float,
    slow_class_signal: float,
    slow_scale: float,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and per-modality float32 features; a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    pair_means = rng.standard_normal((classes // 2, dim))
    fast_class_means = rng.standard_normal((classes, dim))
    slow_means = rng.standard_normal((classes, dim))
    features = {
        "fast": fast_pair_signal * pair_means[labels // 2]
        + fast_class_signal * fast_class_means[labels]
        + rng.standard_normal((samples, dim)),
        "slow": slow_scale * (slow_class_signal * slow_means[labels] + rng.standard_normal((samples, dim))),
    }
    if modalities == 3:
        mid_means = rng.standard_normal((classes, dim))
        features["mid"] = 0.5 * (0.3 * mid_means[labels] + rng.standard_normal((samples, dim)))
    return labels.astype(np.int64), {k: v.astype(np.float32) for k, v in features.items()}


def prepare(job: PrepareJob) -> dict:
    samples = job.option("samples", int)
    modalities = job.option("modalities", int)
    classes = job.option("classes", int)
    dim = job.option("dim", int)
    if modalities not in (2, 3):
        raise DmglError(f"option modalities must be 2 or 3, got {modalities}")
    if classes < 2 or classes % 2:
        raise DmglError(f"option classes must be an even number >= 2, got {classes}")
    if samples < 8 * classes:
        raise DmglError(f"option samples must be at least {8 * classes} for {classes} classes, got {samples}")
    if dim < 1:
        raise DmglError(f"option dim must be >= 1, got {dim}")
    signals = {
        k: float(job.option(k, (int, float)))
        for k in ("fast_pair_signal", "fast_class_signal", "slow_class_signal", "slow_scale")
    }
    labels, features = generate(job.seed, samples, modalities, classes, dim, **signals)
    n_train = samples * 3 // 4
    with PreparedWriter(job.destination) as writer:
        for split, rows in (("train", slice(0, n_train)), ("test", slice(n_train, samples))):
            writer.put(split, "labels", labels[rows])
            for modality, values in features.items():
                writer.put(split, modality, values[rows])
        job.progress(samples, samples, "generated")
        return writer.finish(
            name=job.name,
            classes=[f"class{c}" for c in range(classes)],
            modalities={m: {"kind": "vector", "dtype": "float32", "shape": [dim]} for m in features},
            preparer=NAME,
            preparer_version=VERSION,
            extra={
                "seed": job.seed,
                "options": {"samples": samples, "modalities": modalities, "classes": classes, "dim": dim, **signals},
            },
        )
