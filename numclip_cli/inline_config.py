"""What an architecture config carried inside a checkpoint may contain.

A checkpoint whose backbone open_clip does not know by name carries its config (``model_cfg``) and every backbone
tensor. That config comes from a stranger, so it is checked against an allow-list before anything is built:

- only the fields of a plain CLIP (a ViT or ModifiedResNet image tower and a transformer text tower); fields
  that name something outside the file (``hf_model_name``, ``hf_tokenizer_name``, ``timm_model_name``,
  ``tokenizer_kwargs`` …) are refused, so building never fetches or reads anything, and the tokenizer is
  CLIP's own;
- every size is capped (``CAPS``), so even the shape-only dry run (on torch's ``meta`` device) that checks
  the stored tensors stays cheap, and the image tower's token count is bounded (attention memory grows with
  its square at prediction time, however small the weights).
"""

from __future__ import annotations

import math
from typing import Any

#: inclusive upper bounds of integer fields (the largest open_clip models are well inside them)
CAPS = {
    "embed_dim": 8192, "width": 8192, "layers": 96, "heads": 256, "head_width": 1024, "patch_size": 64,
    "image_size": 1024, "context_length": 1024, "vocab_size": 500_000, "attn_pooler_queries": 1024,
    "attn_pooler_heads": 256, "pad_id": 500_000, "eos_id": 500_000,
}
MAX_IMAGE_TOKENS = 1600  # (image_size / patch_size)², e.g. 40 x 40; open_clip's ViTs use at most 37 x 37
MAX_MLP_RATIO = 16.0
CLIP_VOCAB = 49408  # CLIP's tokenizer: a text tower with fewer token embeddings cannot embed its ids

# every allowed field, by the kind of value it takes
_INTS = {"embed_dim", "width", "layers", "heads", "head_width", "patch_size", "image_size", "context_length",
         "vocab_size", "attn_pooler_queries", "attn_pooler_heads", "pad_id", "eos_id"}
_BOOLS = {"quick_gelu", "nonscalar_logit_scale", "custom_text", "attentional_pool", "no_ln_pre",
          "final_ln_after_pool", "output_tokens", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
          "scale_attn", "scale_fc", "embed_cls", "no_causal_mask", "proj_bias"}
_NUMBERS = {"mlp_ratio", "ls_init_value", "patch_dropout", "init_logit_scale", "init_logit_bias"}
_WORDS = {"pool_type", "pos_embed_type", "block_type", "proj_type"}
_LISTS = {"layers": 4, "image_size": 2}  # a ModifiedResNet's blocks per stage; a (height, width)
_OPTIONAL = {"ls_init_value", "init_logit_bias", "block_type"}  # may be null
_COMMON = {"layers", "width", "mlp_ratio", "ls_init_value", "final_ln_after_pool", "pool_type", "output_tokens",
           "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
           "scale_fc"}
_VISION = _COMMON | {"head_width", "patch_size", "image_size", "patch_dropout", "attentional_pool",
                     "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre", "pos_embed_type"}
_TEXT = _COMMON | {"context_length", "vocab_size", "heads", "embed_cls", "pad_id", "eos_id", "no_causal_mask",
                   "proj_bias", "proj_type"}
_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
        "nonscalar_logit_scale", "custom_text"}
_REQUIRED = {"embed_dim", "vision_cfg", "text_cfg"}
_EXTERNAL = ("hf_", "timm_", "tokenizer_")  # fields that make open_clip fetch or read something
_POSITIVE = {"embed_dim", "width", "heads", "head_width", "patch_size", "image_size", "context_length"}


def check_inline_config(cfg: Any) -> None:
    """Raise ``ValueError`` (a short reason naming the field) unless ``cfg`` is a plain, bounded CLIP config."""
    if not isinstance(cfg, dict):
        raise ValueError("model_cfg is not an object")
    _check_fields(cfg, _TOP, "model_cfg")
    missing = sorted(_REQUIRED - set(cfg))
    if missing:
        raise ValueError(f"model_cfg lacks {', '.join(missing)}")
    for tower, allowed in (("vision_cfg", _VISION), ("text_cfg", _TEXT)):
        if not isinstance(cfg[tower], dict):
            raise ValueError(f"model_cfg.{tower} is not an object")
        _check_fields(cfg[tower], allowed, f"model_cfg.{tower}")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    layers = vision.get("layers", 12)
    if isinstance(layers, list) and sum(layers) > CAPS["layers"]:  # ModifiedResNet: blocks per stage
        raise ValueError(f"model_cfg.vision_cfg.layers: {sum(layers)} blocks in all, at most {CAPS['layers']}")
    if isinstance(layers, int):  # a ViT: bound its token count
        size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
        sides = size if isinstance(size, list) else [size, size]
        tokens = math.prod(side // patch for side in sides)
        if tokens > MAX_IMAGE_TOKENS:
            raise ValueError(f"model_cfg.vision_cfg: {tokens} image tokens ({size} px / patch {patch}), "
                             f"at most {MAX_IMAGE_TOKENS}")
    if text.get("vocab_size", CLIP_VOCAB) < CLIP_VOCAB:
        raise ValueError(f"model_cfg.text_cfg.vocab_size must be at least {CLIP_VOCAB} (CLIP's tokenizer)")


def _check_fields(section: dict[str, Any], allowed: set[str], where: str) -> None:
    for key, value in section.items():
        if not isinstance(key, str) or key not in allowed:
            external = isinstance(key, str) and key.startswith(_EXTERNAL)
            reason = "names a model or tokenizer outside the checkpoint" if external else "is not a known field"
            raise ValueError(f"{where}.{str(key)[:40]} {reason}")
        if key in ("vision_cfg", "text_cfg"):
            continue
        _check_value(value, key, f"{where}.{key}")


def _check_value(value: Any, key: str, where: str) -> None:
    if value is None and key in _OPTIONAL:
        return
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false")
    elif key in _WORDS:
        if not (isinstance(value, str) and 0 < len(value) <= 32 and value.replace("_", "").isalnum()):
            raise ValueError(f"{where} is not a plain option word")
    elif key in _NUMBERS:
        limit = MAX_MLP_RATIO if key == "mlp_ratio" else 1e6
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or abs(value) > limit or (key == "mlp_ratio" and value <= 0):
            raise ValueError(f"{where} must be a number within ±{limit:g}" + (" above 0" if key == "mlp_ratio" else ""))
    elif key in _INTS:
        items = value if isinstance(value, list) and key in _LISTS and len(value) == _LISTS[key] else [value]
        for item in items:
            _check_int(item, key, where)
    else:
        raise ValueError(f"{where} is not a known field")


def _check_int(value: Any, key: str, where: str) -> None:
    lowest = 1 if key in _POSITIVE else 0
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= CAPS[key]:
        raise ValueError(f"{where} must be an integer from {lowest} to {CAPS[key]}")
