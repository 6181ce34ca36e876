"""Mean ± std over seeds: a seed run's numbers summarised for its parent run, the report and the sweep. numpy only
(no torch), so that reading recorded runs never loads what training needs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation of per-seed values, as every table and summary in dmgl reports them.

    The paper reports "mean ± std over 3 seeds" without saying which std; this is the sample standard deviation
    (``ddof=1``) of several values and 0.0 (``ddof=0``) for a single value, where ``ddof=1`` is undefined. A NaN
    among the values makes both NaN; an infinite one makes the std NaN.
    """
    if len(values) == 0:
        raise ValueError("mean_std needs at least one value")
    array = np.asarray(values, dtype=np.float64)
    return float(np.mean(array)), float(np.std(array, ddof=1 if len(array) > 1 else 0))


def summarise_over_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """For every key present in all of the per-seed result dicts: its mean over seeds under the seeds' own key (so
    that a parent run and its seed runs share a column) and its std (:func:`mean_std`) as ``{key}_std``."""
    if not per_seed:
        raise ValueError("summarise_over_seeds needs at least one seed's results")
    return _over_seeds(per_seed)


def _over_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean and ``_std`` of the keys common to all of ``per_seed``. A key whose ``{key}_std`` is itself a seed's
    metric (a method's ``film_scale_std``) keeps that name for the mean of the seeds' values and gets no spread."""
    common_keys = [key for key in per_seed[0] if all(key in results for results in per_seed[1:])]
    summary: dict[str, float] = {}
    for key in common_keys:
        mean, std = mean_std([results[key] for results in per_seed])
        summary[key] = mean
        if f"{key}_std" not in per_seed[0]:
            summary[f"{key}_std"] = std
    return summary


def curves_over_seeds(histories: Sequence[Sequence[Mapping[str, float]]]) -> list[dict[str, float]]:
    """Per epoch (1-based, as the list's index + 1), the mean over seeds of each metric every seed logged at that
    epoch, under the seeds' own key, and its std (:func:`mean_std`) as ``{key}_std``: the parent run's curves. An
    epoch only some seeds reached (one was stopped early) has no point."""
    if not histories:
        return []
    return [_over_seeds([history[epoch] for history in histories]) for epoch in range(min(map(len, histories)))]
