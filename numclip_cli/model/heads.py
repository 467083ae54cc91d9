"""Heads on top of CLIP features: the image adapter, the coarse classifier and the fine regressor (NumCLIP §3.3)."""

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


class FineRegressor(nn.Module):
    """SSR-Net style fine head: ŷ = low_0 + Σ_k p_k · β_k / (1 + Δ_k), with Δ = tanh(MLP(S)) ∈ (−1, 1)."""

    def __init__(self, lower_edges: list[float]) -> None:
        super().__init__()
        num_bins = len(lower_edges)
        edges = torch.tensor(lower_edges, dtype=torch.float32)
        # β are lower edges measured from the first bin (the reference code); the offset returns to task units.
        self.register_buffer("beta", edges - edges[0], persistent=False)
        self.register_buffer("offset", edges[0].clone(), persistent=False)
        self.shift = nn.Sequential(nn.Linear(num_bins, 2 * num_bins), nn.ReLU(inplace=True),
                                   nn.Linear(2 * num_bins, num_bins), nn.Tanh())
        for layer in self.shift:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.001)  # Δ ≈ 0 at start: the readout begins as Σ p_k β_k
                nn.init.zeros_(layer.bias)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Fine value (B,) in the task unit from raw coarse logits (B×K)."""
        probs = logits.float().softmax(dim=-1)
        delta = self.shift(logits.float())
        return self.offset + (probs * self.beta / (1 + delta)).sum(dim=-1)
