"""Tests for numclip_cli.losses: exact FCRC weights, hand-computed values, degenerate batches, devices."""

import math

import pytest
import torch
import torch.nn.functional as F

from numclip_cli.losses import (
    fcrc_ce,
    fcrc_kl,
    fcrc_weights,
    numclip_loss,
    ordinal_pairwise_loss,
    ordinalclip_kl,
)

# The K=5 weight rows printed in the method notes (section 1.5); c=3 and c=4 mirror c=1 and c=0.
K5_ROWS = {
    0: [1.0, 0.4, 0.8, 1.2, 1.6],
    1: [0.5714, 1.0, 0.5714, 1.1429, 1.7143],
    2: [1.3333, 0.6667, 1.0, 0.6667, 1.3333],
}
K5_ROWS[3] = K5_ROWS[1][::-1]
K5_ROWS[4] = K5_ROWS[0][::-1]


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loop_weights(label: int, num_bins: int) -> list[float]:
    """FCRC weight row built the slow, obvious way."""
    total = sum(abs(label - k) for k in range(num_bins))
    return [1.0 if k == label else (num_bins - 1) * abs(label - k) / total for k in range(num_bins)]


def _loop_text_to_image_kl(
    logits: torch.Tensor, labels: list[int], weighted: bool, scale: float = 10.0
) -> float:
    """Text-to-image KL with explicit loops over classes and images, in plain Python floats."""
    rows = logits.tolist()
    num_classes = len(rows[0])
    per_class = []
    for k in range(num_classes):
        if k not in labels:
            continue
        target_logits = [scale if c == k else 0.0 for c in labels]
        target_norm = sum(math.exp(x) for x in target_logits)
        q = [math.exp(x) / target_norm for x in target_logits]
        total = sum(abs(k - c) for c in labels)
        weights = [
            1.0 if (c == k or not weighted) else (num_classes - 1) * abs(k - c) / total for c in labels
        ]
        scores = [w * rows[i][k] for i, w in enumerate(weights)]
        norm = sum(math.exp(s) for s in scores)
        p = [math.exp(s) / norm for s in scores]
        per_class.append(sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True)))
    return sum(per_class) / len(per_class)


# ---------------------------------------------------------------- FCRC weights


@pytest.mark.parametrize("label", range(5))
def test_fcrc_weights_reproduce_the_published_k5_rows(label: int) -> None:
    weights = fcrc_weights(torch.tensor([label]), 5)
    torch.testing.assert_close(weights[0], torch.tensor(K5_ROWS[label]), rtol=1e-4, atol=1e-4)


def test_fcrc_weights_batch_matches_rows_and_loops() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    weights = fcrc_weights(labels, 5)
    assert weights.shape == (6, 5)
    expected = torch.tensor([K5_ROWS[c] for c in labels.tolist()])
    torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-4)
    loops = torch.tensor([_loop_weights(c, 5) for c in labels.tolist()])
    torch.testing.assert_close(weights, loops)


@pytest.mark.parametrize("num_bins", range(2, 11))
def test_fcrc_negative_weights_average_one(num_bins: int) -> None:
    labels = torch.arange(num_bins)
    weights = fcrc_weights(labels, num_bins, dtype=torch.float64)
    positive = labels[:, None] == torch.arange(num_bins)[None, :]
    assert torch.all(weights[positive] == 1)
    negative_means = weights.masked_fill(positive, 0).sum(dim=1) / (num_bins - 1)
    torch.testing.assert_close(negative_means, torch.ones(num_bins, dtype=torch.float64))


def test_fcrc_weights_single_bin_is_all_ones() -> None:
    assert torch.equal(fcrc_weights(torch.tensor([0, 0]), 1), torch.ones(2, 1))


# ---------------------------------------------------------------- CE-FCRC


def test_fcrc_ce_equals_cross_entropy_of_weighted_logits() -> None:
    logits = torch.randn(6, 5, generator=_generator(1)) * 5
    labels = [0, 4, 2, 1, 3, 2]
    omega = torch.tensor([[_loop_weights(c, 5)[k] for k in range(5)] for c in labels])
    expected = F.cross_entropy(logits * omega, torch.tensor(labels))
    torch.testing.assert_close(fcrc_ce(logits, torch.tensor(labels)), expected)


def test_fcrc_ce_weights_carry_no_gradient() -> None:
    logits = torch.randn(3, 5, generator=_generator(2), requires_grad=True)
    labels = torch.tensor([0, 2, 4])
    fcrc_ce(logits, labels).backward()
    # d CE / d S_k = omega_k * (softmax(S * omega)_k - [k == c]): only the logits route the gradient.
    omega = fcrc_weights(labels, 5)
    probs = (logits.detach() * omega).softmax(dim=1)
    expected = omega * (probs - F.one_hot(labels, 5)) / 3
    torch.testing.assert_close(logits.grad, expected)


# ---------------------------------------------------------------- KL-FCRC and OrdinalCLIP KL


def test_fcrc_kl_matches_loops_with_absent_bins() -> None:
    # Bins 1 and 3 are absent; weights are non-trivial: bin 0 -> [1, 1, 3], bin 2 -> [1.5, 1.5, 1].
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.3, 0.8, -0.4, 1.0], [-1.2, 2.2, 1.7, -0.5]])
    labels = [0, 0, 2]
    expected = _loop_text_to_image_kl(logits, labels, weighted=True)
    actual = fcrc_kl(logits, torch.tensor(labels))
    assert actual.item() == pytest.approx(expected, rel=1e-5)
    # Columns of absent bins must not matter.
    shuffled = logits.clone()
    shuffled[:, [1, 3]] = torch.tensor([[9.0, -9.0], [4.0, 4.0], [-3.0, 7.0]])
    assert fcrc_kl(shuffled, torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-5)


def test_fcrc_kl_matches_loops_on_random_batch() -> None:
    logits = torch.randn(8, 5, generator=_generator(3), dtype=torch.float64) * 4
    labels = [0, 1, 1, 3, 4, 4, 4, 0]
    expected = _loop_text_to_image_kl(logits, labels, weighted=True)
    assert fcrc_kl(logits, torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-10)


def test_fcrc_kl_target_scale_is_used() -> None:
    logits = torch.randn(4, 3, generator=_generator(4), dtype=torch.float64)
    labels = [0, 1, 2, 2]
    expected = _loop_text_to_image_kl(logits, labels, weighted=True, scale=3.0)
    assert fcrc_kl(logits, torch.tensor(labels), target_scale=3.0).item() == pytest.approx(
        expected, rel=1e-10
    )


def test_ordinalclip_kl_is_unweighted_text_to_image_kl() -> None:
    logits = torch.randn(7, 6, generator=_generator(5), dtype=torch.float64) * 3
    labels = [0, 5, 5, 2, 3, 0, 1]
    expected = _loop_text_to_image_kl(logits, labels, weighted=False)
    assert ordinalclip_kl(logits, torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-10)
    assert ordinalclip_kl(logits, torch.tensor(labels)).item() != pytest.approx(
        fcrc_kl(logits, torch.tensor(labels)).item(), rel=1e-3
    )


def test_ordinalclip_kl_equals_fcrc_kl_when_all_weights_are_one() -> None:
    # K=2 with one image per bin: the single negative weight is (2-1)*1/1 = 1, so the two losses coincide.
    logits = torch.tensor([[1.5, -0.5], [0.2, 2.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(ordinalclip_kl(logits, labels), fcrc_kl(logits, labels))


# ---------------------------------------------------------------- NumCLIP total


@pytest.mark.parametrize(("kl", "kl_term"), [("fcrc", fcrc_kl), ("plain", ordinalclip_kl), (None, None)])
def test_numclip_loss_sums_its_parts(kl, kl_term) -> None:
    logits = torch.randn(5, 5, generator=_generator(6)) * 10
    labels = torch.tensor([0, 1, 2, 3, 2])
    fine = torch.tensor([1.0, 14.0, 20.0, 40.0, 70.0])
    target = torch.tensor([2, 13, 25, 40, 66])
    parts = numclip_loss(logits, labels, fine, target, kl=kl)
    assert set(parts) == {"ce", "l1", "total"} | ({"kl"} if kl else set())
    torch.testing.assert_close(parts["ce"], fcrc_ce(logits, labels))
    if kl_term is not None:
        torch.testing.assert_close(parts["kl"], kl_term(logits, labels))
    assert parts["l1"].item() == pytest.approx((1 + 1 + 5 + 0 + 4) / 5)
    torch.testing.assert_close(parts["total"], sum(parts[name] for name in parts if name != "total"))
    with pytest.raises(ValueError, match="kl must be one of"):
        numclip_loss(logits, labels, fine, target, kl="weighted")


# ---------------------------------------------------------------- L2RCLIP ordinal pairwise loss

TEXTS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
IMAGES = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
IMAGE_LABELS = torch.tensor([0, 2])


def test_ordinal_pairwise_loss_by_hand_with_rank_indices() -> None:
    # W = [[0,1,2],[2,1,0]], max 2 -> w = [[0,.5,1],[1,.5,0]]; distances [[1,sqrt2,sqrt10],[1,0,2]].
    diversity = -(0.5 * math.sqrt(2) + math.sqrt(10) + 1.0) / 6
    tightness = (1.0 + 4.0) / 2
    loss = ordinal_pairwise_loss(IMAGES, TEXTS, IMAGE_LABELS)
    assert loss.item() == pytest.approx(tightness + diversity, rel=1e-6)


def test_ordinal_pairwise_loss_by_hand_with_rank_values() -> None:
    # Values [10,20,40]: W = [[0,10,30],[30,20,0]], max 30 -> w = [[0,1/3,1],[1,2/3,0]].
    diversity = -(math.sqrt(2) / 3 + math.sqrt(10) + 1.0) / 6
    loss = ordinal_pairwise_loss(IMAGES, TEXTS, IMAGE_LABELS, rank_values=torch.tensor([10, 20, 40]))
    assert loss.item() == pytest.approx(2.5 + diversity, rel=1e-6)


def test_ordinal_pairwise_diversity_term_is_never_positive() -> None:
    gen = _generator(7)
    images, texts = torch.randn(9, 4, generator=gen), torch.randn(6, 4, generator=gen)
    labels = torch.randint(0, 6, (9,), generator=gen)
    tightness = (images - texts[labels]).pow(2).sum(dim=1).mean()
    assert ordinal_pairwise_loss(images, texts, labels) - tightness <= 0


def test_ordinal_pairwise_loss_rewards_distance_from_wrong_ranks() -> None:
    texts = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0])
    image = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = ordinal_pairwise_loss(image, texts, labels)
    assert loss.item() == pytest.approx(-0.5)  # L_t = 0, L_d = -(0*0 + 1*1)/2
    loss.backward()
    # Only the wrong-rank text pulls the gradient: -0.5 * (v - t1)/|v - t1| = (0.5, 0).
    torch.testing.assert_close(image.grad, torch.tensor([[0.5, 0.0]]))
    moved_away = ordinal_pairwise_loss(torch.tensor([[-0.1, 0.0]]), texts, labels)
    assert moved_away.item() == pytest.approx(0.01 - 0.55) and moved_away < loss


def test_ordinal_pairwise_loss_gradient_finite_when_image_equals_a_text() -> None:
    # The image sits exactly on a wrong-rank text (weight 1) and exactly on its own text in a second row.
    images = torch.tensor([[1.0, 0.0], [0.0, 0.0]], requires_grad=True)
    loss = ordinal_pairwise_loss(images, torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(images.grad).all()


def test_ordinal_pairwise_loss_single_rank_has_no_diversity_term() -> None:
    images = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    loss = ordinal_pairwise_loss(images, torch.tensor([[0.0, 1.0]]), torch.tensor([0, 0]))
    assert loss.item() == pytest.approx((2.0 + 0.0) / 2)


# ---------------------------------------------------------------- degenerate batches, dtypes, devices


def _all_losses(
    logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor
) -> dict[str, torch.Tensor]:
    fine = logits.sum(dim=1)
    texts = torch.linspace(
        -1, 1, logits.shape[1] * features.shape[1], dtype=logits.dtype, device=logits.device
    )
    return {
        "fcrc_ce": fcrc_ce(logits, labels),
        "fcrc_kl": fcrc_kl(logits, labels),
        "numclip_total": numclip_loss(logits, labels, fine, labels.to(logits.dtype))["total"],
        "ordinalclip_kl": ordinalclip_kl(logits, labels),
        "ordinal_pairwise": ordinal_pairwise_loss(features, texts.view(logits.shape[1], -1), labels),
    }


@pytest.mark.parametrize("labels", [[2, 2, 2, 2], [3], [0]], ids=["all-equal", "batch-of-one", "one-first"])
def test_every_loss_has_finite_values_and_gradients(labels: list[int]) -> None:
    gen = _generator(8)
    label_tensor = torch.tensor(labels)
    logits = (torch.randn(len(labels), 5, generator=gen) * 100).requires_grad_()
    features = torch.randn(len(labels), 4, generator=gen).requires_grad_()
    for name, loss in _all_losses(logits, label_tensor, features).items():
        logits.grad = features.grad = None
        loss.backward()
        assert torch.isfinite(loss), name
        for tensor in (logits, features):
            assert tensor.grad is None or torch.isfinite(tensor.grad).all(), name


def test_losses_follow_input_dtype() -> None:
    logits = torch.randn(3, 5, generator=_generator(9), dtype=torch.float64)
    features = torch.randn(3, 4, generator=_generator(10), dtype=torch.float64)
    for name, loss in _all_losses(logits, torch.tensor([0, 4, 4]), features).items():
        assert loss.dtype == torch.float64, name


def test_losses_create_nothing_on_a_fixed_device() -> None:
    # The meta device has no data: any tensor created on CPU (or CUDA) would clash with these inputs.
    logits = torch.empty(3, 5, device="meta")
    features = torch.empty(3, 4, device="meta")
    labels = torch.zeros(3, dtype=torch.long, device="meta")
    for name, loss in _all_losses(logits, labels, features).items():
        assert loss.device.type == "meta", name
    assert fcrc_weights(labels, 5).device.type == "meta"
