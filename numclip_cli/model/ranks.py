"""Rank-prompt building blocks: OrdinalCLIP's interpolated rank embeddings and L2RCLIP's RankFormer.

- OrdinalCLIP (Li, Huang et al., NeurIPS 2022, ``xk-huang/OrdinalCLIP``): the M rank embeddings are linear
  mixtures of a few learnable base embeddings placed at ``linspace(0, M−1, n_base)``, with weights
  w_{r,b} ∝ 1 − |r − p_b| / (M − 1) normalised over the bases (the reference's "linear" interpolation, code-
  exact). The weights are global, not piecewise: with two bases the end ranks are the bases themselves, with
  three the first rank is ⅔·E₀ + ⅓·E₁.
- L2RCLIP (Wang et al., NeurIPS 2023): the RankFormer. Its model code was never released; this is the
  reconstruction described in docs/method.md — a pre-LN transformer block in word-embedding space whose attention runs
  *across the M rank prompts* at each token position, blended into the plain prompts as
  P̂ = (1 − α)·P + α·F with a learnable α initialised at 0.01. The block's residual branches start at zero
  (F(P) = P), so training starts exactly from the plain prompts.
"""

from __future__ import annotations

import torch
from torch import nn

from numclip_cli.model.prompt import text_tower

ALPHA_INIT = 0.01  # RankFormer blend: small, so step 0 is (almost) the plain prompts
HEAD_WIDTH = 64  # attention head width of the RankFormer, as in CLIP's text transformers


def base_positions(num_ranks: int, num_base: int) -> torch.Tensor:
    """Where the base embeddings sit on the rank axis: ``linspace(0, M − 1, B)``.

    >>> base_positions(11, 3)
    tensor([ 0.,  5., 10.])
    """
    return torch.linspace(0, num_ranks - 1, num_base)


def interpolation_weights(num_ranks: int, num_base: int) -> torch.Tensor:
    """OrdinalCLIP linear interpolation weights (M×B): w ∝ 1 − |r − p_b|/(M − 1), rows summing to 1.

    >>> interpolation_weights(5, 3)
    tensor([[0.6667, 0.3333, 0.0000],
            [0.4286, 0.4286, 0.1429],
            [0.2500, 0.5000, 0.2500],
            [0.1429, 0.4286, 0.4286],
            [0.0000, 0.3333, 0.6667]])
    """
    if not 1 < num_base <= num_ranks:
        raise ValueError(f"need 2 <= base embeddings ({num_base}) <= ranks ({num_ranks})")
    gaps = (torch.arange(num_ranks, dtype=torch.float32)[:, None] - base_positions(num_ranks, num_base)).abs()
    weights = 1.0 - gaps / (num_ranks - 1)
    return weights / weights.sum(dim=1, keepdim=True)


def phrase_embedding(clip: nn.Module, tokenizer, text: str) -> torch.Tensor:
    """The mean frozen token embedding (d,) of a phrase's tokens, e.g. to initialise a one-token rank word."""
    tower = text_tower(clip)
    ids = torch.tensor(tokenizer.encode(text), device=tower.token_embedding.weight.device)
    with torch.no_grad():
        return tower.token_embedding(ids).mean(dim=0)


class InterpolatedRanks(nn.Module):
    """M rank embeddings (M×d) mixed from learnable base embeddings (B×d) with fixed interpolation weights."""

    def __init__(self, base: torch.Tensor, num_ranks: int) -> None:
        super().__init__()
        self.base = nn.Parameter(base.clone())
        self.register_buffer("weights", interpolation_weights(num_ranks, base.shape[0]), persistent=False)

    def forward(self) -> torch.Tensor:
        """The rank embeddings, one row per rank."""
        return self.weights.to(self.base.dtype) @ self.base


class RankFormer(nn.Module):
    """Pre-LN transformer block with attention across rank prompts, residually blended into the prompts."""

    def __init__(self, width: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, max(1, width // HEAD_WIDTH), batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        # Zero-initialised branch outputs make F(P) = P at step 0. Otherwise each branch adds O(1) vectors to
        # token embeddings of scale ~0.02, and α = 0.01 alone would still move the text features (cos ≈ 0.9).
        for layer in (self.attn.out_proj, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.alpha = nn.Parameter(torch.tensor(ALPHA_INIT))

    def block(self, prompts: torch.Tensor) -> torch.Tensor:
        """The transformer block F(P) on prompts (M×L×d); attention runs over the M ranks at each position."""
        x = prompts.transpose(0, 1)  # L×M×d: token positions are the batch, ranks the sequence
        h = self.ln_attn(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln_mlp(x))
        return x.transpose(0, 1)

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        """Blended prompts P̂ = (1 − α)·P + α·F(P), same shape as ``prompts``."""
        alpha = self.alpha.to(prompts.dtype)
        return (1 - alpha) * prompts + alpha * self.block(prompts)
