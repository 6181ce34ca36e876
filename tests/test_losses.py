import itertools
import math

import pytest
import torch

from dmgl_cli.errors import DmglError
from dmgl_cli.losses import (
    MATCHING_LOSSES,
    classification_loss,
    info_nce,
    js_divergence,
    modality_matching_loss,
    total_loss,
    uniform_label_loss,
)


def _hand_info_nce_2x2(z_a, z_b, tau):
    """The paper's formula written out for two samples, in plain Python floats."""

    def cos(u, w):
        return sum(x * y for x, y in zip(u, w, strict=True)) / (math.hypot(*u) * math.hypot(*w))

    s = [[cos(z_a[i], z_b[k]) for k in range(2)] for i in range(2)]
    total = 0.0
    for i in range(2):
        row = math.exp(s[i][i] / tau) / sum(math.exp(s[i][k] / tau) for k in range(2))
        column = math.exp(s[i][i] / tau) / sum(math.exp(s[k][i] / tau) for k in range(2))
        total += math.log(row) + math.log(column)
    return -total / (2 * 2)


def test_info_nce_matches_hand_computation():
    z_a = [[1.0, 0.0], [1.0, 1.0]]
    z_b = [[2.0, 1.0], [0.0, 3.0]]
    tau = 0.5
    # s = [[2/sqrt5, 0], [3/sqrt10, 1/sqrt2]]: asymmetric, so rows and columns differ
    expected = _hand_info_nce_2x2(z_a, z_b, tau)
    got = info_nce(torch.tensor(z_a, dtype=torch.float64), torch.tensor(z_b, dtype=torch.float64), tau)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # and a number written out independently of the helper
    s11, s12, s21, s22 = 2 / math.sqrt(5), 0.0, 3 / math.sqrt(10), 1 / math.sqrt(2)

    def e(x):
        return math.exp(x / tau)

    by_hand = (
        -(
            math.log(e(s11) / (e(s11) + e(s12)))
            + math.log(e(s22) / (e(s21) + e(s22)))
            + math.log(e(s11) / (e(s11) + e(s21)))
            + math.log(e(s22) / (e(s12) + e(s22)))
        )
        / 4
    )
    assert got.item() == pytest.approx(by_hand, rel=1e-12)


def test_info_nce_is_symmetric_and_scale_invariant():
    generator = torch.Generator().manual_seed(0)
    z_a = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    z_b = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    ab = info_nce(z_a, z_b, 0.2)
    assert ab.item() == pytest.approx(info_nce(z_b, z_a, 0.2).item(), rel=1e-12)
    # cosine similarity ignores the norms of the embeddings
    assert ab.item() == pytest.approx(info_nce(3.0 * z_a, 0.5 * z_b, 0.2).item(), rel=1e-12)


def test_info_nce_of_aligned_orthogonal_embeddings_is_near_zero():
    z = torch.eye(4, dtype=torch.float64)
    loss = info_nce(z, 2.0 * z, 0.01)
    # off-diagonal similarities are 0, diagonal 1: loss = log(1 + 3 exp(-100))
    assert loss.item() == pytest.approx(math.log1p(3 * math.exp(-100)), abs=1e-40)
    assert loss.item() < 1e-40
    # a misaligned pairing is expensive
    assert info_nce(z, z.flip(0), 0.01).item() > 50


def test_info_nce_rejects_non_positive_tau():
    with pytest.raises(DmglError, match="tau must be > 0, got 0"):
        info_nce(torch.eye(2), torch.eye(2), 0.0)


def test_infonce_matching_over_three_modalities_is_mean_of_pairs():
    generator = torch.Generator().manual_seed(1)
    embeddings = {name: torch.randn(5, 3, generator=generator, dtype=torch.float64) for name in ("v", "a", "t")}
    pair_losses = [info_nce(embeddings[a], embeddings[b], 0.1).item() for a, b in [("a", "t"), ("a", "v"), ("t", "v")]]
    got = modality_matching_loss("infonce", embeddings, {}, torch.zeros(5, 2), 0.1)
    assert got.item() == pytest.approx(sum(pair_losses) / 3, rel=1e-12)
    assert len({round(x, 6) for x in pair_losses}) == 3  # the pairs really differ, so the mean is informative


def test_js_divergence_is_zero_for_identical_logits_and_matches_hand_computation():
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    assert js_divergence(logits, logits).item() == pytest.approx(0.0, abs=1e-15)
    # softmax([0, 0]) = (1/2, 1/2); softmax([log 3, 0]) = (3/4, 1/4); m = (5/8, 3/8)
    p, q, m = (0.5, 0.5), (0.75, 0.25), (0.625, 0.375)

    def kl(x, y):
        return sum(xi * math.log(xi / yi) for xi, yi in zip(x, y, strict=True))

    expected_first = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    # second row: one-hot-ish versus uniform over two classes, computed the same way
    p2 = (math.exp(4) / (math.exp(4) + 1), 1 / (math.exp(4) + 1))
    q2 = (0.5, 0.5)
    m2 = tuple((a + b) / 2 for a, b in zip(p2, q2, strict=True))
    expected_second = 0.5 * kl(p2, m2) + 0.5 * kl(q2, m2)
    got = js_divergence(
        torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=torch.float64),
        torch.tensor([[math.log(3), 0.0], [0.0, 0.0]], dtype=torch.float64),
    )
    assert got.item() == pytest.approx((expected_first + expected_second) / 2, rel=1e-12)
    assert got.item() < math.log(2)  # JS is bounded by log 2


def test_js_matching_is_mean_over_pairs_and_symmetric():
    generator = torch.Generator().manual_seed(2)
    logits = {name: torch.randn(4, 3, generator=generator, dtype=torch.float64) for name in ("x", "y", "z")}
    expected = sum(js_divergence(logits[a], logits[b]).item() for a, b in itertools.combinations("xyz", 2)) / 3
    got = modality_matching_loss("js", {}, logits, torch.zeros(4, 3), 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert js_divergence(logits["x"], logits["y"]).item() == pytest.approx(
        js_divergence(logits["y"], logits["x"]).item(), rel=1e-12
    )


def test_uniform_label_loss_is_log_c_for_uniform_logits_and_larger_otherwise():
    assert uniform_label_loss(torch.full((3, 7), 2.5)).item() == pytest.approx(math.log(7), rel=1e-6)
    # -(1/2)(log 0.8 + log 0.2) for softmax = (0.8, 0.2)
    logits = torch.tensor([[math.log(4.0), 0.0]], dtype=torch.float64)
    assert uniform_label_loss(logits).item() == pytest.approx(-(math.log(0.8) + math.log(0.2)) / 2, rel=1e-12)
    fused = torch.tensor([[1.0, 0.0, 0.0]])
    assert modality_matching_loss("uniform", {}, {}, fused, 0.1).item() == pytest.approx(
        uniform_label_loss(fused).item()
    )


def test_classification_and_total_loss():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    expected = -(math.log(0.75) + math.log(0.5)) / 2
    assert classification_loss(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    cls, mm = torch.tensor(2.0), torch.tensor(10.0)
    assert total_loss(0.3, cls, mm).item() == pytest.approx(0.7 * 2.0 + 0.3 * 10.0)
    assert total_loss(torch.tensor(0.0), cls, mm).item() == pytest.approx(2.0)
    assert total_loss(1.0, cls, mm).item() == pytest.approx(10.0)


def test_unknown_matching_kind_lists_valid_names():
    with pytest.raises(DmglError) as error:
        modality_matching_loss("cosine", {}, {}, torch.zeros(1, 2), 0.1)
    message = str(error.value)
    assert "'cosine'" in message
    for name in MATCHING_LOSSES:
        assert name in message
    assert set(MATCHING_LOSSES) == {"infonce", "js", "mixture_kl", "uniform"}


@pytest.mark.parametrize("kind", ["infonce", "js"])
def test_pairwise_matching_needs_two_modalities(kind):
    single = {"audio": torch.randn(3, 2)}
    with pytest.raises(DmglError, match="at least 2"):
        modality_matching_loss(kind, single, single, torch.zeros(3, 2), 0.1)
