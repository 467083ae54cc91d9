"""Numeric precision of the backbone (``--precision``), with open_clip's trainer's names, on every device alike.

- ``fp32``: everything in float32 (the default on CPU and MPS).
- ``amp``: float16 autocast (the default on CUDA); training scales the loss with a ``GradScaler``.
- ``amp_bf16``: bfloat16 autocast (no loss scaling needed: bf16 has float32's exponent range).
- ``bf16`` / ``fp16``: the backbone's frozen weights are stored in that dtype, as open_clip's
  ``convert_weights_to_lp`` casts them (linear, convolution, attention and projection weights; layer norms,
  embeddings and the logit scale stay float32), and the forward pass autocasts to it. Unlike open_clip's
  ``fp16``, weights being trained keep float32 master copies: the optimizer's state of fp16 weights underflows
  (measured: pure fp16 training of numclip-tiny reached NaN within 7 steps). ``fp16`` scales the loss like ``amp``.

Whatever the precision, numclip's own heads and losses run in float32 (``full_precision``): logits are scaled by
up to 100 before a softmax, and the fine regressor divides by ``1 + Δ``; half precision would lose the ordering
of close bins there. The autocast device type and dtype are plain parameters, so the same code runs on CUDA,
CPU (torch autocasts to bf16 and fp16 there too) and MPS.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from numclip_cli.errors import UsageError

# name → (compute dtype under autocast, whether frozen weights are stored in it); ``amp_bfloat16`` is
# open_clip's other spelling of ``amp_bf16``
PRECISIONS: dict[str, tuple[torch.dtype | None, bool]] = {
    "fp32": (None, False),
    "amp": (torch.float16, False),
    "amp_bf16": (torch.bfloat16, False),
    "bf16": (torch.bfloat16, True),
    "fp16": (torch.float16, True),
}
ALIASES = {"amp_bfloat16": "amp_bf16"}


@dataclass(frozen=True)
class Precision:
    """A precision on one device type: how to autocast, which weights to cast, whether to scale the loss."""

    name: str
    device_type: str  # "cuda", "cpu" or "mps": torch's autocast device type

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the backbone computes in under autocast, or None (fp32: autocast off)."""
        return PRECISIONS[self.name][0]

    @property
    def weight_dtype(self) -> torch.dtype | None:
        """The dtype frozen backbone weights are stored in (``bf16``, ``fp16``), or None (kept as loaded)."""
        return self.autocast_dtype if PRECISIONS[self.name][1] else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of a forward pass through the backbone (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled exactly for fp16 autocast (``amp``, ``fp16``), whose small gradients underflow."""
        return torch.amp.GradScaler(self.device_type, enabled=self.autocast_dtype == torch.float16)

    def cast_backbone(self, model: Any) -> None:
        """``bf16``/``fp16``: store an open_clip model's frozen weights in that dtype, in place; parameters that
        require gradients keep their float32 data. Nothing for the other precisions."""
        if self.weight_dtype is None:
            return
        from open_clip.model import convert_weights_to_lp

        trained = {param: param.data for param in model.parameters() if param.requires_grad}
        convert_weights_to_lp(model, dtype=self.weight_dtype)
        for param, data in trained.items():  # the original float32 tensors: no rounding on the way
            param.data = data


def full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off: the region computes in the dtype of its inputs (callers pass float32)."""
    return torch.autocast(device_type, enabled=False)


def default_precision(device_type: str) -> str:
    """``amp`` on CUDA (open_clip's default there), ``fp32`` elsewhere (half precision is rarely faster on a CPU)."""
    return "amp" if device_type == "cuda" else "fp32"


def resolve_precision(name: str | None, device: torch.device | str) -> Precision:
    """``--precision NAME`` (None: the device's default) on ``device``; a usage error when unknown or unsupported."""
    device_type = torch.device(device).type
    if name is None:
        name = default_precision(device_type)
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in PRECISIONS:
        raise UsageError(f"--precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    precision = Precision(name, device_type)
    if precision.autocast_dtype is not None and not torch.amp.is_autocast_available(device_type):
        raise UsageError(f"--precision {name}: torch has no autocast on {device_type}; use fp32, bf16 or fp16")
    return precision
