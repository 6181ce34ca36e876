"""The modality gap made visible (``dmgl report --plot embeddings``, the paper's Figure 2): each modality's test
embeddings from a run's best checkpoint, L2-normalised, projected to 2-D, with their centroids and the gap.

The embeddings are what the model's encoders output (``ModelOutput.embeddings``) on a split, in eval mode with the
evaluation transform, batch by batch as the trainer scores a split (:func:`dmgl_cli.evaluation.evaluate`). The gap is
:func:`dmgl_cli.metrics.mean_pairwise_modality_gap` of those embeddings — Liang et al.'s
``‖mean(a/‖a‖) − mean(b/‖b‖)‖₂``, averaged over the pairs of modalities when there are more than two — the same
function, on the same embeddings, as the ``<split>_modality_gap`` metric training logs, so a seed's best-checkpoint
gap equals its ``final_<split>_modality_gap``. It is measured in the full embedding space, not in the 2-D picture.

The projection is fitted on all modalities' normalised embeddings of one run together: ``pca`` (scikit-learn,
2 components; a linear map, so the 2-D centroid of a modality's points is the projection of its full-dimensional
centroid) or ``umap`` (``umap-learn``, when installed; non-linear, so the 2-D centroid drawn is the mean of the
projected points, and distances in the picture are not the gap). Both are seeded (``random_state=0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dmgl_cli.errors import DmglError

if TYPE_CHECKING:
    from dmgl_cli.recorded import RecordedModel
    from dmgl_cli.report.selection import SeedRun
    from dmgl_cli.tracking import Tracker

PROJECTIONS = ("pca", "umap")


def check_projection(projection: str) -> str:
    """``projection`` if it is known and available; DmglError otherwise (``umap`` needs ``umap-learn``)."""
    if projection not in PROJECTIONS:
        raise DmglError(f"unknown projection {projection!r}; valid: {', '.join(PROJECTIONS)}")
    if projection == "umap":
        import importlib.util

        if importlib.util.find_spec("umap") is None:  # an optional package: not a dependency of dmgl
            raise DmglError(
                "--projection umap needs the umap-learn package (`pip install umap-learn`); --projection pca does not"
            )
    return projection


def best_seed(runs: Sequence[SeedRun]) -> SeedRun:
    """The run with the best validation score on its selection metric (``final_val_<metric>``); a tie, or no
    score at all, goes to the lower seed. Never chosen on test."""

    def key(run: SeedRun) -> tuple[float, int]:
        score = run.metrics.get(f"final_val_{run.select_metric}", -np.inf)
        return (score if np.isfinite(score) else -np.inf, -(run.seed or 0))

    return max(runs, key=key)


def split_embeddings(loaded: RecordedModel, split: str = "test") -> dict[str, np.ndarray]:
    """Each modality's embeddings of ``split`` ([samples, embed_dim], float32, not normalised), as
    :func:`dmgl_cli.evaluation.evaluate` sees them."""
    import torch

    from dmgl_cli.data.loader import eval_loader
    from dmgl_cli.device import autocast, to_device

    chunks: dict[str, list[np.ndarray]] = {}
    loaded.model.eval()
    with torch.no_grad():
        for batch in eval_loader(loaded.dataset, loaded.config, split):
            inputs, _ = to_device(batch, loaded.device)
            with autocast(loaded.device, loaded.config.train.amp):
                output = loaded.method.forward(loaded.model, inputs, training=False)
            for name, embedding in output.embeddings.items():
                chunks.setdefault(name, []).append(embedding.float().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def l2_normalised(embeddings: np.ndarray) -> np.ndarray:
    """Rows divided by their Euclidean norm (a zero row stays zero), in float64."""
    rows = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def project(normalised: dict[str, np.ndarray], projection: str = "pca") -> dict[str, np.ndarray]:
    """Each modality's normalised embeddings in 2-D, from one projection fitted on all of them together."""
    names = list(normalised)
    stacked = np.concatenate([normalised[n] for n in names])
    if projection == "pca":
        from sklearn.decomposition import PCA

        components = min(2, stacked.shape[0], stacked.shape[1])
        flat = PCA(n_components=components, random_state=0).fit_transform(stacked)
    elif projection == "umap":
        import importlib

        umap = importlib.import_module("umap")  # optional (umap-learn), checked by check_projection
        flat = np.asarray(umap.UMAP(n_components=2, random_state=0).fit_transform(stacked))
    else:
        raise DmglError(f"unknown projection {projection!r}; valid: {', '.join(PROJECTIONS)}")
    if flat.shape[1] < 2:  # a one-dimensional embedding: plot it on a line
        flat = np.pad(flat, ((0, 0), (0, 2 - flat.shape[1])))
    out, start = {}, 0
    for name in names:
        out[name] = flat[start : start + len(normalised[name])]
        start += len(normalised[name])
    return out


@dataclass
class EmbeddingPanel:
    """One run's picture: the projected points and 2-D centroids per modality, and the gap in the full space."""

    title: str
    run_id: str
    seed: int | None
    projection: str
    points: dict[str, np.ndarray]  # modality -> [samples, 2]
    centroids: dict[str, np.ndarray]  # modality -> [2], the mean of its projected points
    gap: float  # mean_pairwise_modality_gap of the embeddings (the logged <split>_modality_gap)
    pair_gaps: dict[tuple[str, str], float] = field(default_factory=dict)  # each pair's modality_gap_distance
    logged_gap: float | None = None  # the run's final_<split>_modality_gap, for comparison


def embedding_panel(
    embeddings: dict[str, np.ndarray],
    title: str,
    *,
    run_id: str = "",
    seed: int | None = None,
    projection: str = "pca",
    logged_gap: float | None = None,
) -> EmbeddingPanel:
    """The panel of one run from its raw embeddings (see the module docstring)."""
    import itertools

    from dmgl_cli.metrics import mean_pairwise_modality_gap, modality_gap_distance

    if len(embeddings) < 2:
        raise DmglError(f"{title}: a modality gap needs two or more modalities' embeddings, got {sorted(embeddings)}")
    normalised = {name: l2_normalised(values) for name, values in embeddings.items()}
    points = project(normalised, projection)
    return EmbeddingPanel(
        title=title,
        run_id=run_id,
        seed=seed,
        projection=projection,
        points=points,
        centroids={name: p.mean(axis=0) for name, p in points.items()},
        gap=mean_pairwise_modality_gap(embeddings),
        pair_gaps={
            (a, b): modality_gap_distance(embeddings[a], embeddings[b])
            for a, b in itertools.combinations(sorted(embeddings), 2)
        },
        logged_gap=logged_gap,
    )


def run_panel(
    tracker: Tracker, run: SeedRun, title: str, split: str = "test", projection: str = "pca"
) -> EmbeddingPanel:
    """The panel of a seed run's best checkpoint on ``split``."""
    from dmgl_cli.recorded import load_seed_model

    loaded = load_seed_model(tracker, run.run_id, "best")
    return embedding_panel(
        split_embeddings(loaded, split),
        title,
        run_id=run.run_id,
        seed=run.seed,
        projection=projection,
        logged_gap=run.metrics.get(f"final_{split}_modality_gap"),
    )
