"""Prompt encoder: learnable shared context + learnable concept words through CLIP's frozen text tower.

Each prompt is ``[SOT] ctx_1..ctx_m  w_k,1..w_k,n_k  suffix [EOT]`` (CoOp, Zhou et al. 2022; NumCLIP §3.2),
with variable word length per prompt. The token ids are assembled from separately tokenised parts so the
learnable positions are known exactly; the frozen token embeddings of the whole sequence are computed once
and the learnable vectors are written over their positions on each forward pass.
"""

from __future__ import annotations

import torch
from open_clip.transformer import text_global_pool
from torch import nn

from numclip_cli.errors import TaskSpecError, UsageError


def text_tower(clip: nn.Module) -> nn.Module:
    """The module holding open_clip's text transformer (the CLIP itself, or ``.text`` for custom-text CLIPs)."""
    tower = getattr(clip, "text", clip)
    if not hasattr(tower, "token_embedding"):
        raise UsageError("this backbone's text tower is a Hugging Face model; numclip's prompt learning needs "
                         "open_clip's built-in text transformer (e.g. ViT-B-16, ViT-B-32, RN50)")
    return tower


def _pool_type(tower: nn.Module) -> str:
    return getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")


def _eos_id(tower: nn.Module) -> int | None:
    return getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))


class PromptEncoder(nn.Module):
    """Encode one prompt per word list (bins or ranks) into normalised text features (P×D)."""

    def __init__(self, clip: nn.Module, tokenizer, template: str, words: list[str]) -> None:
        super().__init__()
        tower = text_tower(clip)
        if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id")):
            raise UsageError("this backbone's tokenizer is not open_clip's BPE tokenizer; prompt learning needs it")
        prefix, suffix = template.split("{}")
        ctx_ids = tokenizer.encode(prefix)
        suffix_ids = tokenizer.encode(suffix)
        word_ids = [tokenizer.encode(w) for w in words]
        length = int(tower.positional_embedding.shape[0])
        rows, cols, ids = [], [], torch.zeros(len(words), length, dtype=torch.long)
        for k, wids in enumerate(word_ids):
            seq = [tokenizer.sot_token_id, *ctx_ids, *wids, *suffix_ids, tokenizer.eot_token_id]
            if len(seq) > length or not wids:
                raise TaskSpecError(f"prompt for {words[k]!r} is {len(seq)} tokens; this backbone allows {length}"
                                    if wids else f"bin or rank name {words[k]!r} has no tokens")
            ids[k, : len(seq)] = torch.tensor(seq)
            start = 1 + len(ctx_ids)
            rows += [k] * len(wids)
            cols += list(range(start, start + len(wids)))
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("word_rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        self.register_buffer("word_cols", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.register_buffer("word_lengths", torch.tensor([len(w) for w in word_ids]), persistent=False)
        with torch.no_grad():
            base = tower.token_embedding(ids)
        self.width = int(base.shape[-1])
        self.context = nn.Parameter(base[0, 1 : 1 + len(ctx_ids)].clone())
        self.words = nn.Parameter(base[self.word_rows, self.word_cols].clone())

    def embeddings(self, clip: nn.Module, words: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (P×L×d) with the learnable context and words written in place."""
        # the frozen embeddings are looked up on every call (cheap) rather than cached, so they always match
        # the backbone's current weights, e.g. after a checkpoint replaced a randomly initialised tower
        base = text_tower(clip).token_embedding(self.ids)
        words = self.words if words is None else words
        num_ctx = self.context.shape[0]
        prompts, length = self.ids.shape
        ctx_rows = torch.arange(prompts, device=self.ids.device).repeat_interleave(num_ctx)
        ctx_cols = torch.arange(1, 1 + num_ctx, device=self.ids.device).repeat(prompts)
        rows = torch.cat([ctx_rows, self.word_rows])
        cols = torch.cat([ctx_cols, self.word_cols])
        values = torch.cat([self.context.repeat(prompts, 1), words]).to(base.dtype)
        return base.index_put((rows, cols), values)

    def encode(self, clip: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
        """Run prompt embeddings (P×L×d) through the frozen text tower; returns normalised features (P×D)."""
        tower = text_tower(clip)
        cast = tower.transformer.get_cast_dtype()
        x = embeddings.to(cast) + tower.positional_embedding.to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
        x = text_global_pool(x, self.ids, _pool_type(tower), eos_token_id=_eos_id(tower))
        proj = tower.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return nn.functional.normalize(x.float(), dim=-1)

    def forward(self, clip: nn.Module, words: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features (P×D) of the current prompts."""
        return self.encode(clip, self.embeddings(clip, words))
