"""PMR against the authors' code (fanyunfeng-bit/Modal-Imbalance-PMR, main_Prototype_grad.py): prototypes from the
first tenth of the training batches with the code's momentum schedule, the prototypical cross-entropy for the
slower modality within the modulation window, and the entropy regulariser off by default — checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmgl_cli.config import load_config
from dmgl_cli.methods import build_method
from dmgl_cli.methods.pmr import class_sums, prototype_batches, updated_prototypes
from dmgl_cli.models import ModelOutput, MultimodalModel
from dmgl_cli.models.fusion import ConcatFusion


def _pmr(*overrides: str):
    config = load_config("synthetic", ["method.name=pmr", *(f"method.options.pmr.{o}" for o in overrides)])
    return build_method(config)


def test_prototypes_are_class_means_in_eval_mode():
    # Dropout that would halve or double entries in train mode: the means below hold only in eval mode.
    encoders = nn.ModuleDict({m: nn.Sequential(nn.Dropout(0.5)) for m in ("a", "v")})
    model = MultimodalModel(encoders, ConcatFusion(["a", "v"], 2, 3)).train()
    batches = [
        (
            {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "v": torch.tensor([[0.0, 1.0], [1.0, 0.0]])},
            torch.tensor([0, 0]),
        ),
        ({"a": torch.tensor([[5.0, 6.0]]), "v": torch.tensor([[2.0, 2.0]])}, torch.tensor([1])),
    ]
    sums, counts = class_sums(model, batches, num_classes=3)
    assert counts.tolist() == [2.0, 1.0, 0.0]
    assert model.training  # restored
    first = updated_prototypes(None, sums["a"], counts, momentum=0.2, mix=False)
    assert first.tolist() == [[2.0, 3.0], [5.0, 6.0], [0.0, 0.0]]  # class 2 absent: zero
    old = torch.tensor([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]])
    mixed = updated_prototypes(old, sums["v"], counts, momentum=0.2, mix=True)
    # (1 - 0.2) * mean + 0.2 * old; the absent class keeps its old prototype.
    assert torch.allclose(mixed, torch.tensor([[0.4, 0.4], [1.8, 1.8], [9.0, 9.0]]))
    unmixed = updated_prototypes(old, sums["v"], counts, momentum=0.2, mix=False)
    assert torch.allclose(unmixed, torch.tensor([[0.5, 0.5], [2.0, 2.0], [9.0, 9.0]]))


def test_momentum_starts_with_the_third_computation():
    method = _pmr()
    counts = torch.tensor([1.0, 1.0])
    for value in (1.0, 2.0, 4.0):
        method.update({"a": torch.full((2, 2), value)}, counts)
        if value == 2.0:
            # The code passes epoch 0 before training and after the first epoch: no mixing yet.
            assert method.prototypes["a"].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert method.prototypes["a"][0, 0].item() == pytest.approx(0.8 * 4.0 + 0.2 * 2.0)
    assert method.epoch_statistics()["pmr_proto_shift_a"] == pytest.approx((1.0 + 1.6) * math.sqrt(2) / 2)


def _distance(x: list[float], y: list[float]) -> float:
    return math.sqrt(sum((p - q) ** 2 for p, q in zip(x, y, strict=True)))


EMBEDDINGS = {"a": [[0.0, 0.0], [1.0, 1.0]], "v": [[2.0, 0.0], [0.0, 2.0]]}
PROTOTYPES = {"a": [[0.0, 1.0], [1.0, 0.0], [3.0, 3.0]], "v": [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]}
LABELS = [0, 1]


def _by_hand() -> tuple[dict[str, float], dict[str, float], dict[str, list[list[float]]]]:
    """Per modality: the prototype score (sum of true-class probabilities), the prototype cross-entropy, and the
    class probabilities of each sample."""
    scores, losses, probabilities = {}, {}, {}
    for m in ("a", "v"):
        scores[m], losses[m], probabilities[m] = 0.0, 0.0, []
        for z, label in zip(EMBEDDINGS[m], LABELS, strict=True):
            sims = [-_distance(z, c) for c in PROTOTYPES[m]]
            total = sum(math.exp(s) for s in sims)
            probs = [math.exp(s) / total for s in sims]
            probabilities[m].append(probs)
            scores[m] += probs[label]
            losses[m] += -math.log(probs[label]) / len(LABELS)
    return scores, losses, probabilities


def _step(method, epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    method.prototypes = {m: torch.tensor(p) for m, p in PROTOTYPES.items()}
    embeddings = {m: torch.tensor(z, requires_grad=True) for m, z in EMBEDDINGS.items()}
    output = ModelOutput(logits=torch.zeros(2, 3), unimodal_logits={}, embeddings=embeddings)
    return method.extra_losses(output, torch.tensor(LABELS), {"epoch": epoch}), embeddings


def test_the_slower_modality_gets_the_prototype_cross_entropy():
    scores, losses, _ = _by_hand()
    ratio_a = scores["a"] / scores["v"]
    slower, faster = ("a", "v") if ratio_a < 1 else ("v", "a")
    assert abs(ratio_a - 1) > 0.05
    method = _pmr("alpha=2.0")
    terms, embeddings = _step(method, epoch=1)
    assert set(terms) == {"pmr_proto"}  # no entropy regulariser by default
    assert terms["pmr_proto"].item() == pytest.approx(2.0 * losses[slower], rel=1e-5)
    terms["pmr_proto"].backward()
    assert embeddings[slower].grad is not None and embeddings[faster].grad is None
    logged = method.epoch_statistics()
    assert logged[f"pmr_boost_{slower}"] == 1.0 and logged[f"pmr_boost_{faster}"] == 0.0
    assert logged["pmr_ratio_a"] == pytest.approx(ratio_a, rel=1e-5)


def test_no_prototype_term_outside_the_window():
    method = _pmr("start_epoch=2", "end_epoch=3")
    for epoch in (1, 4):
        terms, _ = _step(method, epoch)
        assert terms["pmr_proto"].item() == 0.0
    assert method.epoch_statistics()["pmr_boost_a"] == 0.0 == method.epoch_statistics()["pmr_boost_v"]


def test_entropy_regulariser_is_an_option():
    scores, _, probabilities = _by_hand()
    dominant = "a" if scores["a"] > scores["v"] else "v"
    entropy = -sum(sum(p * math.log(p) for p in row) for row in probabilities[dominant]) / len(LABELS)
    terms, _ = _step(_pmr("mu=0.1", "entropy_epochs=2"), epoch=2)
    assert terms["pmr_entropy_reg"].item() == pytest.approx(-0.1 * entropy, rel=1e-5)
    late, _ = _step(_pmr("mu=0.1", "entropy_epochs=2"), epoch=3)
    assert late["pmr_entropy_reg"].item() == 0.0


def test_prototype_batches_are_a_tenth_of_the_training_batches(synthetic):
    from dmgl_cli.data.registry import open_dataset
    from dmgl_cli.train import Trainer

    class Sink:
        def log_metrics(self, metrics, step):
            pass

        def save_checkpoint(self, name, state):
            pass

    config = load_config("synthetic", ["method.name=pmr", "strategy.name=constant", "train.batch_size=16"])
    trainer = Trainer(config, open_dataset("synthetic"), 0, Sink())
    train_size = len(trainer.splits.train)  # 405 (450 minus the 10% validation): 26 batches of 16, the last partial
    assert math.ceil(train_size / 16) // 10 == 2

    def labels_of(epoch: int) -> list[list[int]]:
        return [labels.tolist() for _, labels in prototype_batches(trainer, epoch, 0.1)]

    first = labels_of(1)
    assert [len(b) for b in first] == [16, 16]
    assert labels_of(1) == first and labels_of(2) != first  # fixed per epoch (resume), reshuffled each epoch

    # The prototypes built before epoch 1 are the class means of those batches' embeddings, by hand.
    model = trainer.model
    trainer.method.on_epoch_start(model, 1)
    model.eval()
    with torch.no_grad():
        embeddings = [(model.encode(inputs), labels) for inputs, labels in prototype_batches(trainer, 1, 0.1)]
    model.train()
    for modality in ("fast", "slow"):
        for label in range(trainer.dataset.num_classes):
            rows = [z[modality][i] for z, labels in embeddings for i in range(len(labels)) if labels[i] == label]
            prototype = trainer.method.prototypes[modality][label]
            if rows:
                assert torch.allclose(prototype, torch.stack(rows).mean(dim=0), atol=1e-5)
            else:
                assert torch.all(prototype == 0)
