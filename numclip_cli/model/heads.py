"""Heads on top of CLIP features: the image adapter, the coarse classifier and the fine regressors (NumCLIP §3.3).

Three fine regressors turn the coarse bin distribution into a number; each keeps a confident prediction (at
least ``CONFIDENT`` of the mass on one bin) inside that bin:

* ``OffsetRegressor`` (``--method numclip``): one offset in the task unit, read from the image features and
  added to the expectation Σ_k p_k · r_k, inside bounds that narrow from the task range to the top bin's extent
  as the coarse prediction grows confident.
* ``PositionRegressor`` (``--method numclip-position``, numclip 0.2's default): one position inside the bin,
  −1 … 1, read from the image features and mapped onto every bin's ``anchor_spans`` span; ŷ = Σ_k p_k · anchor_k.
* ``FineRegressor`` (``--method numclip-ssr``): the reference's SSR-Net head, a per-bin shift Δ computed from
  the coarse logits alone, its anchors inside ``anchor_spans``.
"""

from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    """Residual bottleneck adapter (CLIP-Adapter): z = normalize(ratio·A(v) + (1−ratio)·v)."""

    def __init__(self, dim: int, ratio: float = 0.8, reduction: int = 4) -> None:
        super().__init__()
        self.ratio = ratio
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Adapted, L2-normalised image features."""
        mixed = self.ratio * self.fc(features) + (1 - self.ratio) * features
        return nn.functional.normalize(mixed, dim=-1)


def coarse_logits(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Image–text similarity logits S = s · z tᵀ (B×K) over the concept bins."""
    return scale * image_features @ text_features.t()


CONFIDENT = 0.9  # a prediction this sure of one bin (the rest on its neighbours) stays inside that bin
UNSURE = 0.5  # at most this on the top bin: the offset head's value may be anywhere in the task range


def anchor_spans(extents: list[tuple[float, float]], representatives: list[float],
                 confident: float = CONFIDENT) -> list[tuple[float, float]]:
    """How far each bin's anchor may move: as far towards its extent's edges as keeps a prediction with at
    least ``confident`` of its mass on bin k, and the rest on k's neighbours, inside bin k's extent.

    Worked from the outside in: the first anchor may reach the task's low end and the last its high end;
    bin k's lowest anchor a satisfies c·a + (1−c)·(lowest anchor of k−1) = start of k, and its highest likewise
    against bin k+1. A span always holds the representative (Δ = 0), even in a spec so lopsided that the bound
    would exclude it.

    >>> [tuple(round(v, 2) for v in span) for span in anchor_spans([(1, 1.5), (1.5, 2.5), (2.5, 3)], [1, 2, 3])]
    [(1, 1.4), (1.56, 2.44), (2.6, 3)]
    """
    leak = (1 - confident) / confident
    lows = [extents[0][0]]
    for start, _ in extents[1:]:
        lows.append(start + leak * (start - lows[-1]))
    highs = [extents[-1][1]]
    for _, end in reversed(extents[:-1]):
        highs.append(end - leak * (highs[-1] - end))
    highs.reverse()
    return [(min(lo, rep), max(hi, rep)) for lo, hi, rep in zip(lows, highs, representatives, strict=True)]


class PositionRegressor(nn.Module):
    """Fine head of ``numclip-position`` (numclip 0.2's ``numclip``): ŷ = Σ_k p_k · (representative_k +
    stretch_k(t)), t = tanh(w·z + b) ∈ [−1, 1].

    t says where inside its bin the image sits (−1: at the bin's low end, 0: its representative, 1: its high
    end); each bin maps t onto its own ``anchor_spans`` span. The position is read from the image features z,
    not from the K coarse logits the SSR head sees, so the L1 term on ŷ trains the image features directly
    (every image's t gets the whole gradient, whatever its bin probabilities).
    """

    def __init__(self, dim: int, extents: list[tuple[float, float]], representatives: list[float]) -> None:
        super().__init__()
        spans = torch.tensor(anchor_spans(extents, representatives), dtype=torch.float64)
        reps = torch.tensor(representatives, dtype=torch.float64)
        self.register_buffer("representatives", reps.float(), persistent=False)
        self.register_buffer("reach_up", (spans[:, 1] - reps).float(), persistent=False)  # ≥ 0
        self.register_buffer("reach_down", (reps - spans[:, 0]).float(), persistent=False)  # ≥ 0
        self.position = nn.Linear(dim, 1)
        nn.init.normal_(self.position.weight, std=0.001)  # t ≈ 0 at start: the readout begins as Σ p_k rep_k
        nn.init.zeros_(self.position.bias)

    def anchors(self, t: torch.Tensor) -> torch.Tensor:
        """Each bin's anchor (B×K) for positions t (B×1) in [−1, 1]."""
        return self.representatives + t * torch.where(t >= 0, self.reach_up, self.reach_down)

    def readout(self, probs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ŷ = Σ_k p_k · anchor_k(t), in the task unit."""
        return (probs * self.anchors(t)).sum(dim=-1)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Fine value (B,) from normalised image features (B×D) and raw coarse logits (B×K)."""
        t = torch.tanh(self.position(features.float()))
        return self.readout(logits.float().softmax(dim=-1), t)


class OffsetRegressor(nn.Module):
    """Fine head of ``numclip``: ŷ = clamp(Σ_k p_k · r_k + δ, L(p), H(p)), δ = w·z + b in the task unit.

    The offset δ, read from the image features z, moves the expectation of the coarse distribution to where the
    image sits, wherever the probability mass is: with 60 % on "one or two" dots and 40 % on "three or four", a
    picture of 1 dot can still read 1 (the position head cannot read below 0.6·1 + 0.4·2.67 ≈ 1.67 there). The
    bounds hold the guarantee of the other heads: the top bin's extent once it holds ``CONFIDENT`` of the mass,
    the task range while it holds at most ``UNSURE``, linearly in between, so the value is continuous in p (the
    top bin only changes where it holds at most half the mass) and never leaves the task range.
    """

    def __init__(self, dim: int, extents: list[tuple[float, float]], representatives: list[float]) -> None:
        super().__init__()
        self.register_buffer("representatives", torch.tensor(representatives, dtype=torch.float32), persistent=False)
        self.register_buffer("extents", torch.tensor(extents, dtype=torch.float32), persistent=False)  # K×2
        self.offset = nn.Linear(dim, 1)
        nn.init.normal_(self.offset.weight, std=0.001)  # δ ≈ 0 at start: the readout begins as Σ p_k r_k
        nn.init.zeros_(self.offset.bias)

    def bounds(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, H) per row of bin probabilities (B×K): the top bin's extent blended with the task range."""
        top_p, top = probs.max(dim=-1)
        trust = ((top_p - UNSURE) / (CONFIDENT - UNSURE)).clamp(0, 1)
        low, high = self.extents[0, 0], self.extents[-1, 1]
        return (1 - trust) * low + trust * self.extents[top, 0], (1 - trust) * high + trust * self.extents[top, 1]

    def readout(self, probs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """ŷ = clamp(Σ_k p_k r_k + δ, L, H) (B,) for probabilities (B×K) and offsets δ (B,), in the task unit."""
        low, high = self.bounds(probs)
        return torch.minimum(torch.maximum(probs @ self.representatives + delta, low), high)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Fine value (B,) from normalised image features (B×D) and raw coarse logits (B×K)."""
        return self.readout(logits.float().softmax(dim=-1), self.offset(features.float()).squeeze(-1))


class FineRegressor(nn.Module):
    """SSR-Net style fine head: ŷ = origin + Σ_k p_k · β_k / (1 + Δ_k), Δ_k from tanh(MLP(S)), bounded per bin.

    Departure from the reference (which anchors on lower edges, β_k = low_k − low_0, offset low_0):

    * β_k = representative_k − origin, so a certain prediction of bin k with Δ = 0 is the value the bin stands
      for (what its label means), not its lower edge.
    * origin lies one task range below the task's low end, so no β is 0 and Δ moves every anchor, bin 0's too
      (the reference pins bin 0 at low_0 whatever Δ).
    * Δ_k = tanh(·) scaled separately on each side of 0 so the anchor origin + β_k/(1+Δ_k) sweeps exactly
      ``anchor_spans``: inside bin k, never outside the task range, and 1 + Δ_k stays above 0 (no 0/0).
    """

    def __init__(self, extents: list[tuple[float, float]], representatives: list[float]) -> None:
        super().__init__()
        num_bins = len(representatives)
        low, high = extents[0][0], extents[-1][1]
        origin = low - (high - low)
        spans = torch.tensor(anchor_spans(extents, representatives), dtype=torch.float64)
        beta = torch.tensor(representatives, dtype=torch.float64) - origin
        # Δ at the span's ends: anchor = origin + β/(1+Δ)  ⇔  Δ = β/(anchor − origin) − 1
        self.register_buffer("beta", beta.float(), persistent=False)
        self.register_buffer("origin", torch.tensor(origin, dtype=torch.float32), persistent=False)
        self.register_buffer("delta_up", (beta / (spans[:, 0] - origin) - 1).float(), persistent=False)  # ≥ 0
        self.register_buffer("delta_down", (1 - beta / (spans[:, 1] - origin)).float(), persistent=False)  # ≥ 0
        self.shift = nn.Sequential(nn.Linear(num_bins, 2 * num_bins), nn.ReLU(inplace=True),
                                   nn.Linear(2 * num_bins, num_bins), nn.Tanh())
        for layer in self.shift:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.001)  # Δ ≈ 0 at start: the readout begins as Σ p_k rep_k
                nn.init.zeros_(layer.bias)

    def delta(self, logits: torch.Tensor) -> torch.Tensor:
        """Δ (B×K) from the raw coarse logits: tanh(MLP(S)) stretched to each bin's bounds."""
        return self.stretch(self.shift(logits.float()))

    def stretch(self, t: torch.Tensor) -> torch.Tensor:
        """Map t ∈ [−1, 1] to Δ: t = 0 keeps the representative, t = 1 reaches the span's low end, −1 its high end."""
        return t * torch.where(t >= 0, self.delta_up, self.delta_down)

    def readout(self, probs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """ŷ = origin + Σ_k p_k β_k / (1 + Δ_k), in the task unit."""
        return self.origin + (probs * self.beta / (1 + delta)).sum(dim=-1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Fine value (B,) in the task unit from raw coarse logits (B×K)."""
        return self.readout(logits.float().softmax(dim=-1), self.delta(logits))
