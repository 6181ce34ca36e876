"""Tests for dmgl_cli.metrics; expected values are worked out by hand in the comments."""

import math

import numpy as np
import pytest
import torch

from dmgl_cli.metrics import (
    MetricAccumulator,
    classification_scores,
    curves_over_seeds,
    mean_pairwise_modality_gap,
    modality_gap_distance,
    performance_gap,
    summarise_over_seeds,
)

# Six samples, three classes. Argmax predictions: [0, 0, 1, 1, 1, 0] against labels [0, 0, 0, 1, 1, 2].
THREE_CLASS_LABELS = np.array([0, 0, 0, 1, 1, 2])
THREE_CLASS_PROBS = np.array(
    [
        [0.80, 0.10, 0.10],
        [0.50, 0.30, 0.20],
        [0.30, 0.60, 0.10],
        [0.20, 0.70, 0.10],
        [0.25, 0.40, 0.35],
        [0.45, 0.15, 0.40],
    ]
)


def test_classification_scores_three_class_by_hand():
    scores = classification_scores(THREE_CLASS_LABELS, THREE_CLASS_PROBS)
    # 4 of 6 argmax predictions are right.
    assert scores["acc"] == pytest.approx(4 / 6)
    # F1: class 0 TP=2 FP=1 FN=1 -> 2/3; class 1 TP=2 FP=1 FN=0 -> P=2/3, R=1 -> 4/5; class 2 TP=0 -> 0.
    assert scores["f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    # AP, ranking each column descending and averaging precision at each positive:
    # class 0 order + + - + - -  -> (1 + 1 + 3/4) / 3 = 11/12
    # class 1 order + - + - - -  -> (1 + 2/3) / 2 = 5/6
    # class 2 order + - ...      -> 1
    assert scores["map"] == pytest.approx((11 / 12 + 5 / 6 + 1) / 3)
    assert all(type(value) is float for value in scores.values())


def test_classification_scores_skips_class_absent_from_labels_in_map_but_not_f1():
    labels = np.array([0, 1, 0, 1])
    probs = np.array(
        [
            [0.6, 0.3, 0.1],
            [0.5, 0.4, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
        ]
    )
    scores = classification_scores(labels, probs)
    # Class 0 order + - + -, class 1 order + - + -: both AP = (1 + 2/3) / 2 = 5/6. Class 2 has no positive and is
    # skipped; counting it as 0 would give 5/9.
    assert scores["map"] == pytest.approx(5 / 6)
    assert scores["acc"] == pytest.approx(2 / 4)
    # Macro F1 still averages over all 3 classes: class 0 and 1 each TP=1 FP=1 FN=1 -> 1/2; class 2 -> 0.
    assert scores["f1"] == pytest.approx(1 / 3)


def test_classification_scores_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match="labels must lie in"):
        classification_scores(np.array([0, 3]), np.full((2, 3), 1 / 3))


def test_classification_scores_equal_scikit_learns_with_ties_and_absent_classes():
    """dmgl computes the scores with numpy; scikit-learn's definitions are the reference, ties of scores included
    (one threshold per distinct score), float32 inputs and classes never true or never predicted."""
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score

    rng = np.random.default_rng(0)
    worst = 0.0
    for trial in range(200):
        samples, classes = int(rng.integers(1, 50)), int(rng.integers(2, 7))
        labels = rng.integers(0, classes, samples)
        probs = rng.random((samples, classes))
        if trial % 2 == 0:
            probs = np.round(probs, 1)  # many tied scores
        if trial % 5 == 0:
            probs = probs.astype(np.float32)
        predictions = probs.argmax(axis=1)
        scores = classification_scores(labels, probs)
        reference_ap = [
            average_precision_score(labels == k, probs[:, k]) for k in range(classes) if np.any(labels == k)
        ]
        reference = {
            "acc": accuracy_score(labels, predictions),
            "map": float(np.mean(reference_ap)),
            "f1": f1_score(labels, predictions, average="macro", labels=list(range(classes)), zero_division=0),  # pyright: ignore[reportArgumentType]
        }
        worst = max(worst, *(abs(scores[k] - reference[k]) for k in reference))
    assert worst <= 1e-12


def test_modality_gap_is_zero_for_embeddings_equal_up_to_scale():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 4))
    assert modality_gap_distance(emb, 3 * emb) == pytest.approx(0.0, abs=1e-12)


def test_modality_gap_of_orthogonal_constant_sets_is_sqrt_two():
    emb_a = np.tile([1.0, 0.0], (5, 1))
    emb_b = np.tile([0.0, 2.0], (5, 1))
    assert modality_gap_distance(emb_a, emb_b) == pytest.approx(math.sqrt(2))


def test_modality_gap_accepts_torch_and_differing_row_counts():
    # Normalised centroid of a is (0.5, 0.5); of b is (1, 0); distance sqrt(0.25 + 0.25).
    emb_a = torch.tensor([[3.0, 0.0], [0.0, 5.0]], requires_grad=True)
    emb_b = torch.tensor([[2.0, 0.0]], dtype=torch.bfloat16)
    assert modality_gap_distance(emb_a, emb_b) == pytest.approx(math.sqrt(0.5))


def test_performance_gap_for_one_two_and_three_modalities():
    assert performance_gap({"audio": 0.7}) == 0.0
    assert performance_gap({"audio": 0.4, "visual": 0.7}) == pytest.approx(0.3)
    assert performance_gap({"visual": 0.7, "audio": 0.4}) == pytest.approx(0.3)
    assert performance_gap({"a": 0.5, "b": 0.9, "c": 0.2}) == pytest.approx(0.7)


def test_mean_pairwise_modality_gap_over_three_modalities():
    embeddings = {
        "text": np.array([[1.0, 0.0]]),
        "image": np.array([[0.0, 1.0]]),
        "audio": np.array([[-1.0, 0.0]]),
    }
    # Pairs: text-image sqrt2, text-audio 2, image-audio sqrt2.
    expected = (math.sqrt(2) + 2 + math.sqrt(2)) / 3
    assert mean_pairwise_modality_gap(embeddings) == pytest.approx(expected)


def _three_batches():
    """Three batches of sizes 4, 2, 5 with two modalities, logits that need grad, and constant per-batch losses."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for batch_size, loss_value in ((4, 1.0), (2, 4.0), (5, 2.0)):
        batches.append(
            {
                "labels": torch.randint(0, 3, (batch_size,), generator=generator),
                "fused_logits": torch.randn(batch_size, 3, generator=generator, requires_grad=True),
                "unimodal_logits": {
                    "audio": torch.randn(batch_size, 3, generator=generator),
                    "visual": torch.randn(batch_size, 3, generator=generator),
                },
                "embeddings": {
                    "audio": torch.randn(batch_size, 8, generator=generator),
                    "visual": torch.randn(batch_size, 8, generator=generator) + 1.0,
                },
                "losses": {"loss_total": torch.tensor(loss_value)},
                "batch_size": batch_size,
            }
        )
    return batches


def test_accumulator_matches_metrics_on_concatenated_data():
    batches = _three_batches()
    accumulator = MetricAccumulator()
    for batch in batches:
        accumulator.add(**batch)
    results = accumulator.compute("val")

    labels = torch.cat([b["labels"] for b in batches]).numpy()
    expected = {}
    fused = torch.softmax(torch.cat([b["fused_logits"] for b in batches]).detach(), dim=-1).numpy()
    for metric, value in classification_scores(labels, fused).items():
        expected[f"val_{metric}"] = value
    per_modality = {}
    for name in ("audio", "visual"):
        probs = torch.softmax(torch.cat([b["unimodal_logits"][name] for b in batches]), dim=-1).numpy()
        per_modality[name] = classification_scores(labels, probs)
        for metric, value in per_modality[name].items():
            expected[f"val_{metric}_{name}"] = value
    for metric in ("acc", "map", "f1"):
        expected[f"val_gap_{metric}"] = abs(per_modality["audio"][metric] - per_modality["visual"][metric])
    expected["val_modality_gap"] = modality_gap_distance(
        torch.cat([b["embeddings"]["audio"] for b in batches]),
        torch.cat([b["embeddings"]["visual"] for b in batches]),
    )
    # Weighted by batch size: (4*1 + 2*4 + 5*2) / 11 = 2; an unweighted mean of batches would be 7/3.
    expected["val_loss_total"] = 2.0

    assert set(results) == set(expected)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-6), key
    assert results["val_modality_gap"] > 0.1

    predicted_labels, predicted_probs = accumulator.predictions()
    np.testing.assert_array_equal(predicted_labels, labels)
    np.testing.assert_allclose(predicted_probs, fused, rtol=1e-6)


def test_accumulator_omits_per_modality_keys_and_gaps_without_unimodal_outputs():
    accumulator = MetricAccumulator()
    for batch in _three_batches():
        accumulator.add(batch["labels"], batch["fused_logits"], {}, {}, batch["losses"], batch["batch_size"])
    assert set(accumulator.compute("test")) == {"test_acc", "test_map", "test_f1", "test_loss_total"}


def test_accumulator_omits_modality_gap_for_a_single_embedded_modality():
    accumulator = MetricAccumulator()
    for batch in _three_batches():
        accumulator.add(
            batch["labels"],
            batch["fused_logits"],
            batch["unimodal_logits"],
            {"audio": batch["embeddings"]["audio"]},
            {},
            batch["batch_size"],
        )
    results = accumulator.compute("val")
    assert "val_modality_gap" not in results
    assert {"val_acc_audio", "val_acc_visual", "val_gap_acc", "val_gap_map", "val_gap_f1"} <= set(results)


def test_accumulator_keeps_float32_probabilities_from_half_precision_logits():
    accumulator = MetricAccumulator()
    logits = torch.tensor([[0.0, 12.0], [12.0, 0.0]], dtype=torch.bfloat16)
    accumulator.add(torch.tensor([1, 0]), logits, {}, {}, {}, 2)
    _, probs = accumulator.predictions()
    assert probs.dtype == np.float32
    # exp(-12) ~ 6.1e-6 survives in float32 next to ~1.0.
    assert probs[0, 0] == pytest.approx(math.exp(-12) / (1 + math.exp(-12)), rel=1e-3)


def test_accumulator_add_does_not_read_values_back_to_the_host(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("add() read a tensor value back to the host")

    for method in ("item", "tolist", "cpu", "numpy", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    accumulator = MetricAccumulator()
    for batch in _three_batches():
        accumulator.add(**batch)


def test_accumulator_rejects_modalities_changing_between_batches():
    first, second, _ = _three_batches()
    accumulator = MetricAccumulator()
    accumulator.add(**first)
    second["unimodal_logits"].pop("visual")
    with pytest.raises(ValueError, match="uni-modal logits names changed"):
        accumulator.add(**second)


def test_accumulator_compute_without_batches_raises():
    with pytest.raises(ValueError, match="no batches"):
        MetricAccumulator().compute("val")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect device-host synchronisation")
def test_accumulator_add_on_cuda_does_not_synchronise():
    batches = _three_batches()
    moved = []
    for batch in batches:
        moved.append(
            {
                "labels": batch["labels"].cuda(),
                "fused_logits": batch["fused_logits"].detach().cuda(),
                "unimodal_logits": {k: v.cuda() for k, v in batch["unimodal_logits"].items()},
                "embeddings": {k: v.cuda() for k, v in batch["embeddings"].items()},
                "losses": {k: v.cuda() for k, v in batch["losses"].items()},
                "batch_size": batch["batch_size"],
            }
        )
    accumulator = MetricAccumulator()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in moved:
            accumulator.add(**batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert accumulator.compute("val")["val_loss_total"] == pytest.approx(2.0)


def test_summarise_over_seeds_mean_and_sample_std_of_common_keys():
    per_seed = [{"acc": 0.5, "only_first": 1.0}, {"acc": 0.7}, {"acc": 0.9}]
    summary = summarise_over_seeds(per_seed)
    assert set(summary) == {"acc", "acc_std"}  # the seeds' own name for the mean: one column for parent and seeds
    assert summary["acc"] == pytest.approx(0.7)
    # Sample std: sqrt((0.2^2 + 0 + 0.2^2) / 2) = 0.2 (population std would be 0.1633).
    assert summary["acc_std"] == pytest.approx(0.2)


def test_summarise_over_seeds_single_seed_and_nan():
    assert summarise_over_seeds([{"acc": 0.8}]) == {"acc": 0.8, "acc_std": 0.0}
    summary = summarise_over_seeds([{"map": 0.5}, {"map": float("nan")}])
    assert math.isnan(summary["map"]) and math.isnan(summary["map_std"])


def test_a_seed_metric_named_like_a_spread_keeps_its_name():
    # a method's own `film_scale_std` is a seed metric: the parent's mean of it must not be overwritten by the
    # spread of `film_scale`, which then has none
    summary = summarise_over_seeds([{"s": 1.0, "s_std": 0.1}, {"s": 3.0, "s_std": 0.3}])
    assert summary == {"s": 2.0, "s_std": pytest.approx(0.2), "s_std_std": pytest.approx(math.sqrt(0.02))}


def test_curves_over_seeds_mean_and_std_per_epoch_where_every_seed_has_the_value():
    histories = [
        [{"val_acc": 0.5, "test_acc": 0.4}, {"val_acc": 0.7}],
        [{"val_acc": 0.7}, {"val_acc": 0.9, "test_acc": 0.8}, {"val_acc": 1.0}],  # a third epoch: the other stopped
    ]
    curves = curves_over_seeds(histories)
    assert len(curves) == 2
    assert curves[0] == {"val_acc": pytest.approx(0.6), "val_acc_std": pytest.approx(math.sqrt(0.02))}
    assert curves[1] == {"val_acc": pytest.approx(0.8), "val_acc_std": pytest.approx(math.sqrt(0.02))}
    assert curves_over_seeds([]) == []
