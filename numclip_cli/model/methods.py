"""Ordinal methods over one CLIP backbone: NumCLIP coarse-to-fine (Du et al., ECCV 2024) and zero-shot CLIP.

Every method maps images to ``Output``: logits over its classes (bins or ranks), bin probabilities and a fine
value in the task unit. Text features depend only on the prompts, so inference computes them once
(``text_features()``) and passes them to every batch (``forward(images, text_features)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from numclip_cli.backbone import Backbone
from numclip_cli.errors import UsageError
from numclip_cli.losses import numclip_loss
from numclip_cli.model.heads import Adapter, FineRegressor, coarse_logits
from numclip_cli.model.prompt import PromptEncoder
from numclip_cli.tasks import TaskSpec

_MAX_LOGIT_SCALE = 100.0


@dataclass
class Output:
    """What a method predicts for a batch."""

    logits: torch.Tensor  # B×C over the method's classes (bins, or ranks for rank methods)
    value: torch.Tensor  # B fine value in the task unit (expected-value readout for rank methods)
    value_max: torch.Tensor | None = None  # B argmax readout, for rank methods only


class OrdinalModel(nn.Module):
    """Base class: a CLIP backbone, a task, and the parts a method adds on top."""

    method = "base"
    tunes_prompts = True

    def __init__(self, backbone: Backbone, task: TaskSpec) -> None:
        super().__init__()
        self.clip = backbone.model
        self.task = task
        self.embed_dim = int(self.clip.text_projection.shape[-1]) if _has_proj(self.clip) else _probe_dim(backbone)
        midpoints = torch.tensor([b.midpoint for b in task.bins], dtype=torch.float32)
        self.register_buffer("midpoints", midpoints, persistent=False)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's temperature, frozen (exp(log-scale), capped at 100 as in CLIP training)."""
        return self.clip.logit_scale.detach().exp().clamp(max=_MAX_LOGIT_SCALE)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw image-tower features (B×D)."""
        return self.clip.encode_image(images)

    def text_features(self) -> torch.Tensor:
        """Normalised text features of every class prompt (C×D); constant at inference."""
        raise NotImplementedError

    def head(self, features: torch.Tensor, text_features: torch.Tensor) -> Output:
        """Logits and values from raw image features."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> Output:
        """Predict a batch; pass cached ``text_features`` at inference to skip the text tower."""
        if text_features is None:
            text_features = self.text_features()
        return self.head(self.encode_images(images), text_features)

    def loss(self, out: Output, values: torch.Tensor, bins: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses by name; ``total`` is optimised."""
        raise NotImplementedError(f"method {self.method!r} is not trained")

    def bin_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the task's bins (identity for bin-level methods)."""
        return logits

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups the trainer may unfreeze, by name."""
        return {"visual": list(self.clip.visual.parameters())}


def _has_proj(clip: nn.Module) -> bool:
    proj = getattr(getattr(clip, "text", clip), "text_projection", None)
    return isinstance(proj, torch.Tensor) and proj.ndim == 2


def _probe_dim(backbone: Backbone) -> int:
    """Embedding width for towers whose projection is not a plain matrix: ask the model."""
    size = backbone.image_size
    with torch.no_grad():
        device = next(backbone.model.parameters()).device
        return int(backbone.model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1])


class ZeroShot(OrdinalModel):
    """Hand-written prompts per bin; p = softmax(S), value = Σ p_k · midpoint_k. Nothing is trained."""

    method = "zeroshot"
    tunes_prompts = False

    def __init__(self, backbone: Backbone, task: TaskSpec) -> None:
        super().__init__(backbone, task)
        self.prompt = PromptEncoder(self.clip, backbone.tokenizer, task.prompt, task.bin_names)
        self.prompt.requires_grad_(False)

    def text_features(self) -> torch.Tensor:
        """Text features of the hand-written prompts."""
        return self.prompt(self.clip)

    def head(self, features: torch.Tensor, text_features: torch.Tensor) -> Output:
        """Similarity logits and the probability-weighted bin midpoint."""
        z = nn.functional.normalize(features.float(), dim=-1)
        logits = coarse_logits(z, text_features, self.logit_scale)
        return Output(logits=logits, value=logits.softmax(-1) @ self.midpoints)

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Nothing to train."""
        return {}


class NumClip(OrdinalModel):
    """Coarse-to-fine NumCLIP: learnable concept prompts, image adapter, SSR-style fine regressor."""

    method = "numclip"

    def __init__(self, backbone: Backbone, task: TaskSpec) -> None:
        super().__init__(backbone, task)
        self.prompt = PromptEncoder(self.clip, backbone.tokenizer, task.prompt, task.bin_names)
        self.adapter = Adapter(self.embed_dim)
        self.regressor = FineRegressor([b.low for b in task.bins])

    def text_features(self) -> torch.Tensor:
        """Text features of the learned concept prompts."""
        return self.prompt(self.clip)

    def head(self, features: torch.Tensor, text_features: torch.Tensor) -> Output:
        """Coarse logits over bins and the fine value from them."""
        z = self.adapter(features.float())
        logits = coarse_logits(z, text_features, self.logit_scale)
        return Output(logits=logits, value=self.regressor(logits))

    def loss(self, out: Output, values: torch.Tensor, bins: torch.Tensor) -> dict[str, torch.Tensor]:
        """CE-FCRC + KL-FCRC + L1 on the fine value (all weight 1, as the NumCLIP authors state)."""
        return numclip_loss(out.logits, bins, out.value, values)

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """context, words, adapter + fine head, image tower."""
        return {
            "context": [self.prompt.context],
            "words": [self.prompt.words],
            "head": [*self.adapter.parameters(), *self.regressor.parameters()],
            **super().trainable_groups(),
        }


METHODS: dict[str, type[OrdinalModel]] = {cls.method: cls for cls in (NumClip, ZeroShot)}


def create_model(method: str, backbone: Backbone, task: TaskSpec) -> OrdinalModel:
    """Build the named method on a backbone for a task, with the backbone frozen."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}: choose one of {sorted(METHODS)}")
    backbone.model.requires_grad_(False)
    model = METHODS[method](backbone, task)
    return model.to(next(backbone.model.parameters()).device)
