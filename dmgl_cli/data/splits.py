"""Seeded, stratified splits (a validation split carved from train; CREMA-D's train/test split)."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out): about ``fraction`` of every class goes to held_out, at least one per class
    with two or more samples. Deterministic in ``seed``; both index arrays are sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held_out = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        count = int(round(fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        held_out.append(members[:count])
    held = np.sort(np.concatenate(held_out)) if held_out else np.array([], dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held)
    return kept.astype(np.int64), held.astype(np.int64)
