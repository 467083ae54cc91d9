"""Ordinal methods over one CLIP backbone, registered by their ``--method`` name (equations and every departure
from the papers: docs/methods.md).

- ``numclip``: coarse-to-fine NumCLIP (Du et al., ECCV 2024) — concept prompts per bin, coarse CE-FCRC, and a
  fine head that reads an offset from the image features and adds it to the bins' expectation (the default).
- ``numclip-position``: numclip 0.2's default — the fine head reads one position inside the bin instead.
- ``numclip-ssr``: NumCLIP as the reference builds it — adapter, SSR fine head on the coarse logits, KL-FCRC too.
- ``l2rclip``: L2RCLIP (Wang et al., NeurIPS 2023) — one prompt per rank, RankFormer across the rank prompts,
  CE + the cross-modal ordinal pairwise loss. Trained single-stage: prompts, RankFormer and (when tuned) the
  image tower together, not the paper's two stages (prompts on cached image features, then the image tower):
  one schedule, one set of epochs, and a randomly initialised image tower learns from the first step.
- ``ordinalclip``: OrdinalCLIP (Li, Huang et al., NeurIPS 2022) — rank embeddings interpolated from 3 learnable
  base embeddings, CE + KL text→image. The shared context is the task prompt's own words (learnable), not 10
  random tokens, and each base embedding starts as the words of the rank it sits at, so step 0 reads like the
  task's sentence.
- ``coop``: CoOp (Zhou et al., IJCV 2022) — learnable shared context before the fixed bin names, CE over bins.
- ``zeroshot``: hand-written prompts per bin, nothing trained.
- ``linear-probe``: a linear classifier over ranks on standardised frozen image features (the trainer computes
  them once per run, not once per epoch).

Every method maps images to ``Output``: logits over its classes (bins or ranks), a fine value in the task unit,
and for rank methods the argmax readout too; ``bin_logits`` turns the logits into logits over the task's bins.
Text features depend only on the prompts, so inference computes them once (``text_features()``) and passes
them to every batch (``forward(images, text_features)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from numclip_cli.backbone import Backbone
from numclip_cli.errors import TaskSpecError, UsageError
from numclip_cli.losses import numclip_loss, ordinal_pairwise_loss, ordinalclip_kl
from numclip_cli.model.heads import Adapter, FineRegressor, OffsetRegressor, PositionRegressor, coarse_logits
from numclip_cli.model.prompt import PromptEncoder
from numclip_cli.model.ranks import InterpolatedRanks, RankFormer, base_positions, phrase_embedding
from numclip_cli.tasks import TaskSpec

_MAX_LOGIT_SCALE = 100.0


@dataclass
class Output:
    """What a method predicts for a batch."""

    logits: torch.Tensor  # B×C over the method's classes (bins, or ranks for rank methods)
    value: torch.Tensor  # B fine value in the task unit (expected-value readout for rank methods)
    value_max: torch.Tensor | None = None  # B argmax readout, for rank methods only
    features: torch.Tensor | None = None  # B×D normalised image features, for losses on embeddings (L2RCLIP)
    text: torch.Tensor | None = None  # C×D text features the logits were computed from


class OrdinalModel(nn.Module):
    """Base class: a CLIP backbone, a task, and the parts a method adds on top."""

    method = "base"
    tunes_prompts = True
    learns_context = False  # the method itself trains the shared context: the trainer's --tune-context default
    head_lr_scale = 1.0  # the "head" group trains at this × --lr unless --head-lr is given

    def __init__(self, backbone: Backbone, task: TaskSpec) -> None:
        super().__init__()
        self.clip = backbone.model
        self.task = task
        self.embed_dim = int(self.clip.text_projection.shape[-1]) if _has_proj(self.clip) else _probe_dim(backbone)
        representatives = torch.tensor(task.representatives(), dtype=torch.float32)
        self.register_buffer("representatives", representatives, persistent=False)

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


class BinPrompts(OrdinalModel):
    """One prompt per bin (the task's sentence); p = softmax(S), value = Σ p_k · representative_k."""

    def __init__(self, backbone: Backbone, task: TaskSpec) -> None:
        super().__init__(backbone, task)
        self.prompt = PromptEncoder(self.clip, backbone.tokenizer, task.prompt, task.bin_names)
        self.prompt.requires_grad_(False)

    def text_features(self) -> torch.Tensor:
        """Text features of the bin prompts."""
        return self.prompt(self.clip)

    def head(self, features: torch.Tensor, text_features: torch.Tensor) -> Output:
        """Similarity logits and the probability-weighted representative values of the bins."""
        z = nn.functional.normalize(features.float(), dim=-1)
        logits = coarse_logits(z, text_features, self.logit_scale)
        return Output(logits=logits, value=logits.softmax(-1) @ self.representatives)


class ZeroShot(BinPrompts):
    """Hand-written prompts per bin. Nothing is trained."""

    method = "zeroshot"
    tunes_prompts = False

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Nothing to train."""
        return {}


class CoOp(BinPrompts):
    """CoOp: a learnable shared context before the fixed bin names; CE over bins, expectation readout."""

    method = "coop"
    learns_context = True

    def loss(self, out: Output, values: torch.Tensor, bins: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy over the bins."""
        ce = nn.functional.cross_entropy(out.logits, bins)
        return {"ce": ce, "total": ce}

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """context (the bin names stay fixed), image tower."""
        return {"context": [self.prompt.context], **super().trainable_groups()}


class NumClip(OrdinalModel):
    """Coarse-to-fine NumCLIP with the offset head: learnable concept prompts, coarse logits trained with
    CE-FCRC, and a fine value that moves the bins' expectation by an offset read from the image features
    (``OffsetRegressor``). Departs from the reference in three measured ways (docs/methods.md): no image adapter,
    a text-to-image KL term without the FCRC weights, and a fine head that reads the image features at
    ``head_lr_scale``× the prompts' learning rate."""

    method = "numclip"
    head_lr_scale = 30.0
    kl: str | None = "plain"  # ``losses.numclip_loss``: the text-to-image KL without the FCRC weights

    def __init__(self, backbone: Backbone, task: TaskSpec) -> None:
        super().__init__(backbone, task)
        self.prompt = PromptEncoder(self.clip, backbone.tokenizer, task.prompt, task.bin_names)
        # The reference freezes the context for age and decades and trains it for aesthetics: the task says which.
        self.learns_context = task.tune_context
        self.build_heads(task)

    def build_heads(self, task: TaskSpec) -> None:
        """The parts between the image features and the value."""
        self.regressor = OffsetRegressor(self.embed_dim, task.extents(), task.representatives())

    def head_modules(self) -> list[nn.Module]:
        """What ``build_heads`` made: the "head" parameter group."""
        return [self.regressor]

    def text_features(self) -> torch.Tensor:
        """Text features of the learned concept prompts."""
        return self.prompt(self.clip)

    def head(self, features: torch.Tensor, text_features: torch.Tensor) -> Output:
        """Coarse logits over bins and the fine value from them and the image features."""
        z = nn.functional.normalize(features.float(), dim=-1)
        logits = coarse_logits(z, text_features, self.logit_scale)
        return Output(logits=logits, value=self.regressor(z, logits))

    def loss(self, out: Output, values: torch.Tensor, bins: torch.Tensor) -> dict[str, torch.Tensor]:
        """CE-FCRC + the method's text-to-image KL term (if any) + L1 on the fine value, all weight 1."""
        return numclip_loss(out.logits, bins, out.value, values, kl=self.kl)

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """context, words, fine head (with the adapter, when there is one), image tower."""
        return {
            "context": [self.prompt.context],
            "words": [self.prompt.words],
            "head": [p for module in self.head_modules() for p in module.parameters()],
            **super().trainable_groups(),
        }


class NumClipPosition(NumClip):
    """numclip 0.2's default: the fine value from where inside its bin the image features place the image
    (``PositionRegressor``), the head at 10× the prompts' learning rate, no KL term. Format-2 checkpoints of
    ``numclip`` load as this method."""

    method = "numclip-position"
    head_lr_scale = 10.0
    kl = None

    def build_heads(self, task: TaskSpec) -> None:
        """One position inside the bin, from the image features."""
        self.regressor = PositionRegressor(self.embed_dim, task.extents(), task.representatives())


class NumClipSSR(NumClip):
    """NumCLIP as the reference builds it: image adapter, SSR-style fine head on the coarse logits, CE-FCRC +
    KL-FCRC + L1, the head at the prompts' learning rate."""

    method = "numclip-ssr"
    head_lr_scale = 1.0
    kl = "fcrc"

    def build_heads(self, task: TaskSpec) -> None:
        """CLIP-Adapter on the image features, SSR fine head on the coarse logits."""
        self.adapter = Adapter(self.embed_dim)
        self.regressor = FineRegressor(task.extents(), task.representatives())

    def head_modules(self) -> list[nn.Module]:
        """The adapter and the SSR head."""
        return [self.adapter, self.regressor]

    def head(self, features: torch.Tensor, text_features: torch.Tensor) -> Output:
        """Coarse logits over bins from the adapted features and the fine value from the logits alone."""
        z = self.adapter(features.float())
        logits = coarse_logits(z, text_features, self.logit_scale)
        return Output(logits=logits, value=self.regressor(logits))


class RankModel(OrdinalModel):
    """Base of the rank methods: one class per rank (``task.rank_values()``), expected-value and argmax readouts."""

    def __init__(self, backbone: Backbone, task: TaskSpec) -> None:
        super().__init__(backbone, task)
        ranks = task.rank_values()
        if len(ranks) < 2:
            raise TaskSpecError(f"task {task.name!r} has {len(ranks)} rank(s); rank methods need at least 2 "
                                f"(set ranks = \"bins\" in the task spec)")
        self.register_buffer("rank_values", torch.tensor(ranks, dtype=torch.float32), persistent=False)
        in_bin = torch.tensor([task.bin_index(v) for v in ranks])[:, None] == torch.arange(len(task.bins))
        self.register_buffer("rank_in_bin", in_bin, persistent=False)  # M×K: rank r lies in bin k

    @property
    def num_ranks(self) -> int:
        """How many ranks (fine classes) the method scores."""
        return int(self.rank_values.shape[0])

    def rank_output(self, logits: torch.Tensor, **embeddings: torch.Tensor) -> Output:
        """Both readouts from rank logits: Σ_r p_r · value_r, and the value of the most probable rank."""
        probs = logits.float().softmax(dim=-1)
        return Output(logits=logits, value=probs @ self.rank_values, value_max=self.rank_values[logits.argmax(-1)],
                      **embeddings)

    def bin_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logsumexp of the rank logits inside each bin, so softmax over bins = summed rank probabilities."""
        return logits[:, :, None].masked_fill(~self.rank_in_bin, float("-inf")).logsumexp(dim=1)

    def rank_labels(self, values: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """Each label's rank index: its bin for ``ranks = "bins"`` tasks, else the nearest rank value."""
        if self.task.ranks == "bins":
            return bins
        return (values[:, None] - self.rank_values[None, :]).abs().argmin(dim=1)

    def similarity_output(self, features: torch.Tensor, text_features: torch.Tensor) -> Output:
        """Rank logits s · z tᵀ of the normalised image features against the rank prompts."""
        z = nn.functional.normalize(features.float(), dim=-1)
        return self.rank_output(coarse_logits(z, text_features, self.logit_scale), features=z, text=text_features)


class OrdinalClip(RankModel):
    """OrdinalCLIP: rank embeddings interpolated from learnable base embeddings; CE + KL text→image."""

    method = "ordinalclip"
    learns_context = True
    num_base = 3  # base embeddings at linspace(0, M − 1, 3), as the reference's default
    placeholder = "X"  # one token per rank in the tokenised prompt; its embedding is replaced by the rank's

    def __init__(self, backbone: Backbone, task: TaskSpec) -> None:
        super().__init__(backbone, task)
        self.prompt = PromptEncoder(self.clip, backbone.tokenizer, task.prompt, [self.placeholder] * self.num_ranks)
        self.prompt.words.requires_grad_(False)  # overwritten by the interpolated rank embeddings
        names = task.rank_names()
        # Each base starts as the words of the rank it sits at ("1", "5", "10"), so step 0 reads like the task.
        base = torch.stack([phrase_embedding(self.clip, backbone.tokenizer, names[round(float(p))])
                            for p in base_positions(self.num_ranks, min(self.num_base, self.num_ranks))])
        self.ranks = InterpolatedRanks(base, self.num_ranks)

    def text_features(self) -> torch.Tensor:
        """Text features of the rank prompts with the interpolated rank embeddings in place."""
        return self.prompt(self.clip, self.ranks())

    def head(self, features: torch.Tensor, text_features: torch.Tensor) -> Output:
        """Rank logits and both readouts."""
        return self.similarity_output(features, text_features)

    def loss(self, out: Output, values: torch.Tensor, bins: torch.Tensor) -> dict[str, torch.Tensor]:
        """CE over ranks + OrdinalCLIP's KL text→image term (weight 1 each)."""
        labels = self.rank_labels(values, bins)
        ce = nn.functional.cross_entropy(out.logits, labels)
        kl = ordinalclip_kl(out.logits, labels)
        return {"ce": ce, "kl": kl, "total": ce + kl}

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """context, base rank embeddings, image tower."""
        return {"context": [self.prompt.context], "words": [self.ranks.base], **super().trainable_groups()}


class L2RClip(RankModel):
    """L2RCLIP: rank prompts refined by the RankFormer; CE + cross-modal ordinal pairwise loss (single stage)."""

    method = "l2rclip"
    learns_context = True

    def __init__(self, backbone: Backbone, task: TaskSpec) -> None:
        super().__init__(backbone, task)
        self.prompt = PromptEncoder(self.clip, backbone.tokenizer, task.prompt, task.rank_names())
        self.rankformer = RankFormer(self.prompt.width)
        # Positions after the longest prompt's EOT are padding that the causal text tower never reads.
        self.span = int(self.prompt.ids.argmax(dim=1).max()) + 1

    def text_features(self) -> torch.Tensor:
        """Text features of the rank prompts after the RankFormer."""
        prompts = self.prompt.embeddings(self.clip)
        mixed = torch.cat([self.rankformer(prompts[:, : self.span]), prompts[:, self.span :]], dim=1)
        return self.prompt.encode(self.clip, mixed)

    def head(self, features: torch.Tensor, text_features: torch.Tensor) -> Output:
        """Rank logits, both readouts, and the embeddings the pairwise loss compares."""
        return self.similarity_output(features, text_features)

    def loss(self, out: Output, values: torch.Tensor, bins: torch.Tensor) -> dict[str, torch.Tensor]:
        """CE over ranks + L_cop = L_t + L_d (``losses.ordinal_pairwise_loss``, safe on degenerate batches)."""
        labels = self.rank_labels(values, bins)
        ce = nn.functional.cross_entropy(out.logits, labels)
        # Weights |y_i − r_j| on rank values, as the reference (indices differ from values for unequal bins)
        cop = ordinal_pairwise_loss(out.features, out.text, labels, self.rank_values)
        return {"ce": ce, "cop": cop, "total": ce + cop}

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """context, rank words, RankFormer, image tower."""
        return {"context": [self.prompt.context], "words": [self.prompt.words],
                "rankformer": list(self.rankformer.parameters()), **super().trainable_groups()}


class LinearProbe(RankModel):
    """Linear probe: standardised frozen image features (cached once by the trainer) → linear classifier over ranks."""

    method = "linear-probe"
    tunes_prompts = False

    def __init__(self, backbone: Backbone, task: TaskSpec) -> None:
        super().__init__(backbone, task)
        # Per-dimension standardisation (BatchNorm without affine, as in MAE's linear probe): CLIP features share
        # a large common direction, and an unscaled linear head on them learns very slowly.
        self.norm = nn.BatchNorm1d(self.embed_dim, affine=False)
        self.classifier = nn.Linear(self.embed_dim, self.num_ranks)

    def text_features(self) -> torch.Tensor:
        """No prompts: an empty 0×D tensor keeps the interface of the prompt methods."""
        return self.rank_values.new_zeros(0, self.embed_dim)

    def head(self, features: torch.Tensor, text_features: torch.Tensor) -> Output:
        """Rank logits of the standardised image features and both readouts."""
        x = features.float()
        # A training batch of one has no batch statistics: standardise it with the running ones instead.
        batch_stats = self.training and x.shape[0] > 1
        z = nn.functional.batch_norm(x, self.norm.running_mean, self.norm.running_var, training=batch_stats,
                                     momentum=self.norm.momentum, eps=self.norm.eps)
        return self.rank_output(self.classifier(z))

    def loss(self, out: Output, values: torch.Tensor, bins: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy over the ranks."""
        ce = nn.functional.cross_entropy(out.logits, self.rank_labels(values, bins))
        return {"ce": ce, "total": ce}

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """The linear classifier only: the image tower stays frozen."""
        return {"head": list(self.classifier.parameters())}


METHODS: dict[str, type[OrdinalModel]] = {
    cls.method: cls for cls in (NumClip, NumClipPosition, NumClipSSR, L2RClip, OrdinalClip, CoOp, ZeroShot, LinearProbe)
}


def create_model(method: str, backbone: Backbone, task: TaskSpec) -> OrdinalModel:
    """Build the named method on a backbone for a task, with the backbone frozen."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}: choose one of {sorted(METHODS)}")
    backbone.model.requires_grad_(False)
    model = METHODS[method](backbone, task)
    return model.to(next(backbone.model.parameters()).device)
