"""Evaluation metrics for multimodal classifiers with per-modality ("uni-modal") heads.

Classification scores (accuracy, MAP, macro F1) are computed here with numpy, as scikit-learn's
``accuracy_score``, ``average_precision_score`` and ``f1_score(average="macro", zero_division=0)`` define them
(tests/test_metrics.py checks them against scikit-learn): importing scikit-learn took ~0.85 s of every run's first
evaluation. The modality gap is the centroid distance of
Liang et al. 2022 ("Mind the Gap"); the performance gap is the spread of per-modality scores. The
:class:`MetricAccumulator` gathers an evaluation pass on the device and pays for host transfers once, in
:meth:`MetricAccumulator.compute`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dmgl_cli.over_seeds import curves_over_seeds, mean_std, summarise_over_seeds

ArrayLike = np.ndarray | torch.Tensor


def classification_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, mean average precision and macro F1 of class probabilities.

    ``labels`` holds ``n`` integer class ids in ``[0, c)``; ``probs`` is ``(n, c)``. Returns ``acc`` (accuracy of the
    argmax), ``map`` (mean one-vs-rest average precision over the classes that have at least one positive in
    ``labels``; AP is undefined for the others, so they are skipped) and ``f1`` (macro F1 of the argmax over all ``c``
    classes, a class never true nor predicted counting as 0). Since ``labels`` must be non-empty and in range, at least
    one class always has a positive, so ``map`` is always defined.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs)
    if labels.ndim != 1 or probs.ndim != 2 or labels.shape[0] != probs.shape[0]:
        raise ValueError(f"expected labels (n,) and probs (n, c); got {labels.shape} and {probs.shape}")
    num_samples, num_classes = probs.shape
    if num_samples == 0:
        raise ValueError("cannot score an empty set of predictions")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids; got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{labels.min()}, {labels.max()}]")

    predictions = probs.argmax(axis=1)
    accuracy = float(np.mean(predictions == labels))
    per_class_ap = [
        average_precision(labels == class_id, probs[:, class_id])
        for class_id in range(num_classes)
        if np.any(labels == class_id)
    ]
    return {"acc": accuracy, "map": float(np.mean(per_class_ap)), "f1": macro_f1(labels, predictions, num_classes)}


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """The unweighted mean over classes ``0..num_classes-1`` of ``2 TP / (2 TP + FP + FN)``, a class never true
    nor predicted counting as 0."""
    true_positives = np.bincount(labels[labels == predictions], minlength=num_classes).astype(np.float64)
    actual = np.bincount(labels, minlength=num_classes)
    predicted = np.bincount(predictions, minlength=num_classes)
    denominator = (actual + predicted).astype(np.float64)
    scores = np.divide(2 * true_positives, denominator, out=np.zeros(num_classes), where=denominator > 0)
    return float(np.mean(scores))


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of ``scores`` for the boolean ``positive``: the sum over the distinct score thresholds,
    highest first, of the recall gained times the precision there (``sum_n (R_n - R_{n-1}) P_n``; tied scores
    form one threshold). ``positive`` must hold at least one True."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked_scores, ranked_positive = scores[order], positive[order].astype(np.float64)
    # the last index of each run of equal scores: a threshold takes all the tied samples at once
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked_scores)), ranked_scores.size - 1]
    true_positives = np.cumsum(ranked_positive)[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _as_float64_matrix(embeddings: ArrayLike) -> np.ndarray:
    if isinstance(embeddings, torch.Tensor):
        # .float() first: numpy has no bfloat16, and a tensor that needs grad cannot become an array.
        embeddings = embeddings.detach().float().cpu().numpy()
    matrix = np.asarray(embeddings, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n, d) embedding matrix; got shape {matrix.shape}")
    return matrix


def _normalised_centroid(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    # Same floor as torch.nn.functional.normalize, so an all-zero row stays zero instead of becoming NaN.
    return (embeddings / np.maximum(norms, 1e-12)).mean(axis=0)


def modality_gap_distance(emb_a: ArrayLike, emb_b: ArrayLike) -> float:
    """Modality gap of Liang et al. 2022: ``‖mean(a/‖a‖) − mean(b/‖b‖)‖₂`` over the rows of two embedding sets.

    Accepts numpy arrays or torch tensors of shape ``(n_a, d)`` and ``(n_b, d)``; the row counts may differ.
    """
    matrix_a = _as_float64_matrix(emb_a)
    matrix_b = _as_float64_matrix(emb_b)
    if matrix_a.shape[1] != matrix_b.shape[1]:
        raise ValueError(f"embedding widths differ: {matrix_a.shape[1]} vs {matrix_b.shape[1]}")
    return float(np.linalg.norm(_normalised_centroid(matrix_a) - _normalised_centroid(matrix_b)))


def performance_gap(per_modality: Mapping[str, float]) -> float:
    """Spread of per-modality scores: ``|a − b|`` for two modalities, ``max − min`` for more, 0.0 for one."""
    if not per_modality:
        raise ValueError("performance_gap needs at least one modality")
    if len(per_modality) == 1:
        return 0.0
    values = np.array(list(per_modality.values()), dtype=np.float64)
    # np.max/np.min propagate NaN, unlike the builtins whose result depends on where the NaN sits.
    return float(np.max(values) - np.min(values))


def mean_pairwise_modality_gap(embeddings: Mapping[str, ArrayLike]) -> float:
    """:func:`modality_gap_distance` averaged over every unordered pair of modalities (taken in sorted name order)."""
    if len(embeddings) < 2:
        raise ValueError(f"a modality gap needs at least two modalities; got {sorted(embeddings)}")
    distances = [
        modality_gap_distance(embeddings[name_a], embeddings[name_b])
        for name_a, name_b in itertools.combinations(sorted(embeddings), 2)
    ]
    return float(np.mean(distances))


class MetricAccumulator:
    """Collects one evaluation pass batch by batch and scores it at the end.

    :meth:`add` only queues device work (detach, softmax, weighted loss sums) and never reads a value back, so an
    evaluation loop on an accelerator does not stall per batch. :meth:`compute` concatenates each stream once and
    copies it to the host once. Every batch must carry the same modality names and loss names, because the streams
    are concatenated and the loss means share one sample count.
    """

    def __init__(self) -> None:
        self._labels: list[torch.Tensor] = []
        self._fused_probs: list[torch.Tensor] = []
        self._unimodal_probs: dict[str, list[torch.Tensor]] = {}
        self._embeddings: dict[str, list[torch.Tensor]] = {}
        self._weighted_loss_sums: dict[str, torch.Tensor] = {}
        self._batch_losses: list[dict[str, torch.Tensor]] = []  # each batch's weighted losses (sharded evaluation)
        self._batch_sizes: list[int] = []
        self._num_samples = 0
        self._host_cache: _HostArrays | None = None

    def add(
        self,
        labels: torch.Tensor,
        fused_logits: torch.Tensor,
        unimodal_logits: Mapping[str, torch.Tensor],
        embeddings: Mapping[str, torch.Tensor],
        losses: Mapping[str, torch.Tensor],
        batch_size: int,
    ) -> None:
        """Queue one batch; ``losses`` are 0-dim batch means, weighted here by ``batch_size``."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        if self._labels:
            self._check_same_names("uni-modal logits", self._unimodal_probs, unimodal_logits)
            self._check_same_names("embeddings", self._embeddings, embeddings)
            self._check_same_names("losses", self._weighted_loss_sums, losses)
        else:
            self._unimodal_probs = {name: [] for name in unimodal_logits}
            self._embeddings = {name: [] for name in embeddings}

        self._labels.append(labels.detach())
        self._fused_probs.append(_float32_softmax(fused_logits))
        for name, logits in unimodal_logits.items():
            self._unimodal_probs[name].append(_float32_softmax(logits))
        for name, embedding in embeddings.items():
            self._embeddings[name].append(embedding.detach())
        weighted_losses = {name: loss.detach().to(torch.float32) * batch_size for name, loss in losses.items()}
        self._add_weighted_losses(weighted_losses, batch_size)

    def _add_weighted_losses(self, weighted_losses: Mapping[str, torch.Tensor], batch_size: int) -> None:
        for name, weighted in weighted_losses.items():
            previous = self._weighted_loss_sums.get(name)
            self._weighted_loss_sums[name] = weighted if previous is None else previous + weighted
        self._batch_losses.append(dict(weighted_losses))
        self._batch_sizes.append(batch_size)
        self._num_samples += batch_size
        self._host_cache = None

    def batch_records(self) -> list[dict[str, Any]]:
        """Each batch added so far, on the host, as :meth:`add_records` takes them back: a data-parallel
        evaluation gathers every rank's records and adds them in the order of the batches."""
        return [
            {
                "labels": self._labels[i].cpu(),
                "fused_probs": self._fused_probs[i].cpu(),
                "unimodal_probs": {name: chunks[i].cpu() for name, chunks in self._unimodal_probs.items()},
                "embeddings": {name: chunks[i].cpu() for name, chunks in self._embeddings.items()},
                "weighted_losses": {name: loss.cpu() for name, loss in self._batch_losses[i].items()},
                "batch_size": self._batch_sizes[i],
            }
            for i in range(len(self._labels))
        ]

    def add_records(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Add batches from :meth:`batch_records` (of this or another process) as :meth:`add` added them: the
        metrics of a sharded evaluation equal those of one process that added the same batches in this order."""
        for record in records:
            if not self._labels:
                self._unimodal_probs = {name: [] for name in record["unimodal_probs"]}
                self._embeddings = {name: [] for name in record["embeddings"]}
            self._labels.append(record["labels"])
            self._fused_probs.append(record["fused_probs"])
            for name, probs in record["unimodal_probs"].items():
                self._unimodal_probs[name].append(probs)
            for name, embedding in record["embeddings"].items():
                self._embeddings[name].append(embedding)
            self._add_weighted_losses(record["weighted_losses"], int(record["batch_size"]))

    def predictions(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels ``(n,)`` and fused class probabilities ``(n, c)`` (float32) of every sample added so far."""
        host = self._to_host()
        return host.labels, host.fused_probs

    def compute(self, prefix: str) -> dict[str, float]:
        """Flat metrics of everything added so far.

        Keys: ``{prefix}_acc|map|f1`` for the fused prediction; ``{prefix}_acc|map|f1_{modality}`` per uni-modal head
        and ``{prefix}_gap_acc|map|f1`` (their :func:`performance_gap`) when uni-modal logits were given;
        ``{prefix}_modality_gap`` (:func:`mean_pairwise_modality_gap`) when embeddings of two or more modalities were
        given; ``{prefix}_{loss}`` as the sample-weighted mean of each loss.
        """
        host = self._to_host()
        results: dict[str, float] = {}
        for metric, value in classification_scores(host.labels, host.fused_probs).items():
            results[f"{prefix}_{metric}"] = value

        if host.unimodal_probs:
            per_modality = {
                name: classification_scores(host.labels, probs) for name, probs in host.unimodal_probs.items()
            }
            for name, scores in per_modality.items():
                for metric, value in scores.items():
                    results[f"{prefix}_{metric}_{name}"] = value
            for metric in ("acc", "map", "f1"):
                gap = performance_gap({name: scores[metric] for name, scores in per_modality.items()})
                results[f"{prefix}_gap_{metric}"] = gap

        # One modality has no partner to be distant from, so the key is left out rather than invented.
        if len(host.embeddings) >= 2:
            results[f"{prefix}_modality_gap"] = mean_pairwise_modality_gap(host.embeddings)

        for name, weighted_sum in host.weighted_loss_sums.items():
            key = f"{prefix}_{name}"
            if key in results:
                raise ValueError(f"loss name {name!r} collides with metric key {key!r}")
            results[key] = weighted_sum / self._num_samples
        return results

    def _to_host(self) -> _HostArrays:
        if not self._labels:
            raise ValueError("no batches were added to the accumulator")
        if self._host_cache is None:
            loss_names = list(self._weighted_loss_sums)
            loss_sums = (
                torch.stack([self._weighted_loss_sums[name] for name in loss_names]).cpu().double().numpy()
                if loss_names
                else np.empty(0)
            )
            self._host_cache = _HostArrays(
                labels=torch.cat(self._labels).cpu().numpy(),
                fused_probs=torch.cat(self._fused_probs).cpu().numpy(),
                unimodal_probs={name: torch.cat(chunks).cpu().numpy() for name, chunks in self._unimodal_probs.items()},
                embeddings={name: torch.cat(chunks).cpu() for name, chunks in self._embeddings.items()},
                weighted_loss_sums={name: float(total) for name, total in zip(loss_names, loss_sums, strict=True)},
            )
        return self._host_cache

    @staticmethod
    def _check_same_names(what: str, seen: Mapping[str, object], given: Mapping[str, object]) -> None:
        if set(seen) != set(given):
            raise ValueError(f"{what} names changed between batches: {sorted(seen)} then {sorted(given)}")


@dataclass(frozen=True)
class _HostArrays:
    """Host copies of an accumulator's streams, kept until the next :meth:`MetricAccumulator.add`."""

    labels: np.ndarray
    fused_probs: np.ndarray
    unimodal_probs: dict[str, np.ndarray]
    embeddings: dict[str, torch.Tensor]
    weighted_loss_sums: dict[str, float]


def _float32_softmax(logits: torch.Tensor) -> torch.Tensor:
    # float32 so half-precision logits do not lose the small probabilities that rank samples for MAP.
    return torch.softmax(logits.detach().to(torch.float32), dim=-1)


__all__ = [
    "MetricAccumulator",
    "classification_scores",
    "curves_over_seeds",
    "mean_pairwise_modality_gap",
    "mean_std",
    "modality_gap_distance",
    "performance_gap",
    "summarise_over_seeds",
]
