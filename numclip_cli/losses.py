"""Ordinal CLIP training losses: NumCLIP's FCRC, OrdinalCLIP's KL term, L2RCLIP's ordinal pairwise loss.

References:
- NumCLIP: Du et al., "Teach CLIP to Develop a Number Sense for Ordinal Regression", ECCV 2024
  (`xmed-lab/NumCLIP`) -- fine-grained cross-modal ranking regulariser (CE-FCRC + KL-FCRC) plus L1.
- L2RCLIP: Wang et al., "Learning-to-Rank Meets Language", NeurIPS 2023 (`raywang335/L2RCLIP`)
  -- cross-modal ordinal pairwise loss.
- OrdinalCLIP: Li, Huang et al., "OrdinalCLIP: Learning Rank Prompts for Language-Guided Ordinal
  Regression", NeurIPS 2022 (`xk-huang/OrdinalCLIP`) -- text-to-image KL term.

Every function is vectorised (no loops over samples or classes) and creates its tensors on the device and
dtype of its inputs, unlike the reference code, which loops over samples, round-trips through numpy and
hard-codes `cuda:0`.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

# Floor for squared distances before the square root (the L2RCLIP reference clamps at 1e-12): it keeps the
# gradient of ||v - t|| finite when an image feature coincides with a text feature.
_SQUARED_DISTANCE_FLOOR = 1e-12


def _distance_weights(distance: Tensor, dim: int, scale: int, dtype: torch.dtype) -> Tensor:
    """FCRC weights: scale * distance normalised along `dim`; zero distance (the positive) gets weight 1."""
    # An all-zero slice has no negatives to normalise (every sample in one bin, or a single bin); clamping
    # the denominator leaves its zeros at 0 until the positive fill below, instead of producing 0/0 = NaN.
    total = distance.sum(dim=dim, keepdim=True).clamp_min(1)
    weights = scale * distance.to(dtype) / total.to(dtype)
    return weights.masked_fill(distance == 0, 1.0)


def fcrc_weights(labels: Tensor, num_bins: int, dtype: torch.dtype | None = None) -> Tensor:
    """Image-to-text FCRC weights [B, K]: (K-1)|c-k| / sum_k'|c-k'| for k != c and 1 for the true bin c."""
    bins = torch.arange(num_bins, device=labels.device)
    distance = (labels[:, None] - bins[None, :]).abs()
    return _distance_weights(distance, dim=1, scale=num_bins - 1, dtype=dtype or torch.get_default_dtype())


def fcrc_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """CE-FCRC: cross-entropy of the logits scaled by the FCRC weights (far negatives are pushed harder)."""
    # The weights depend on labels only; detach anyway so they stay constants even if labels ever carry grad.
    weights = fcrc_weights(labels, logits.shape[1], dtype=logits.dtype).detach()
    return F.cross_entropy(logits * weights, labels)


def _text_to_image_kl(
    logits: Tensor, labels: Tensor, target_scale: float, weights: Tensor | None = None
) -> Tensor:
    """Mean over classes present in the batch of KL(q_k || softmax over images of the (weighted) logits)."""
    classes = torch.arange(logits.shape[1], device=logits.device)
    members = classes[:, None] == labels[None, :]  # [C, B]: image i belongs to class k
    present = members.any(dim=1)
    scores = logits.t() if weights is None else logits.t() * weights
    log_p = scores.log_softmax(dim=1)
    # softmax(10 * one-hot) over the batch is strictly positive, so log q is finite and no 0*log(0) arises;
    # rows of absent classes (uniform targets) are dropped below, as the reference zeroes their targets.
    log_q = (target_scale * members.to(logits.dtype)).log_softmax(dim=1)
    kl_per_class = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    # Masked mean, not boolean indexing: no host-device sync; a non-empty batch has a present class.
    return torch.where(present, kl_per_class, 0.0).sum() / present.sum()


def fcrc_kl(logits: Tensor, labels: Tensor, target_scale: float = 10.0) -> Tensor:
    """KL-FCRC: text-to-image KL over the batch with FCRC weights normalised across the batch."""
    num_bins = logits.shape[1]
    bins = torch.arange(num_bins, device=logits.device)
    distance = (bins[:, None] - labels[None, :]).abs()  # [K, B]
    # Faithful to the reference: the weights are normalised over the *batch* (B images) yet scaled by K-1,
    # not B-1, so they average (K-1)/(number of negatives); with B much larger than K every negative weight
    # is near 0 and the negatives' logits are nearly flattened. Kept because the published results used it.
    weights = _distance_weights(distance, dim=1, scale=num_bins - 1, dtype=logits.dtype).detach()
    return _text_to_image_kl(logits, labels, target_scale, weights)


def ordinalclip_kl(logits: Tensor, rank_labels: Tensor, target_scale: float = 10.0) -> Tensor:
    """OrdinalCLIP's text-to-image KL term over ranks (KL-FCRC without weights)."""
    return _text_to_image_kl(logits, rank_labels, target_scale)


# numclip_loss's text-to-image KL terms: the reference's weighted KL-FCRC, or the same KL unweighted
KL_TERMS = {"fcrc": fcrc_kl, "plain": ordinalclip_kl}


def numclip_loss(
    logits: Tensor, labels: Tensor, fine_value: Tensor, target_value: Tensor, kl: str | None = "fcrc"
) -> dict[str, Tensor]:
    """NumCLIP objective: CE-FCRC + a text-to-image KL term + L1 on the fine value, all weight 1 (as the authors
    state). ``kl``: ``"fcrc"`` the reference's KL-FCRC (``--method numclip-ssr``), ``"plain"`` the same KL
    without the FCRC weights, as OrdinalCLIP uses it (``--method numclip``), None no KL term
    (``--method numclip-position``); see docs/methods.md."""
    terms = {"ce": fcrc_ce(logits, labels)}
    if kl is not None:
        if kl not in KL_TERMS:
            raise ValueError(f"kl must be one of {tuple(KL_TERMS)} or None, got {kl!r}")
        terms["kl"] = KL_TERMS[kl](logits, labels)
    terms["l1"] = F.l1_loss(fine_value, target_value.to(fine_value.dtype))
    return {**terms, "total": sum(terms.values())}


def ordinal_pairwise_loss(
    image_features: Tensor, text_features: Tensor, labels: Tensor, rank_values: Tensor | None = None
) -> Tensor:
    """L2RCLIP cross-modal ordinal pairwise loss L_t + L_d over all B images and M rank texts."""
    dtype = image_features.dtype
    if rank_values is None:
        ranks = torch.arange(text_features.shape[0], device=image_features.device, dtype=dtype)
    else:
        ranks = rank_values.to(device=image_features.device, dtype=dtype)
    gaps = (ranks[labels][:, None] - ranks[None, :]).abs()  # W [B, M]
    # The reference computes (W - min W) / max W; min W is 0 because every label is one of the ranks. When
    # max W is 0 (a single rank) W is all zeros, so any positive denominator yields w = 0 instead of NaN.
    pair_weights = gaps / gaps.max().clamp_min(torch.finfo(dtype).tiny)
    # Exact differences rather than |v|^2 + |t|^2 - 2 v.t, which cancels badly near zero distance.
    squared = (image_features[:, None, :] - text_features[None, :, :]).pow(2).sum(dim=-1)
    # sqrt has an infinite slope at 0: clamping (as the reference does) gives a zero, finite gradient for an
    # image feature that coincides with a text feature. The floor is raised to the dtype's smallest normal
    # number where 1e-12 would underflow (float16).
    floor = max(_SQUARED_DISTANCE_FLOOR, torch.finfo(dtype).tiny)
    distances = squared.clamp_min(floor).sqrt()
    diversity = -(pair_weights * distances).mean()  # L_d <= 0: farther from wrong-rank texts is better
    tightness = (image_features - text_features[labels]).pow(2).sum(dim=1).mean()  # L_t: pull to own rank
    return tightness + diversity
