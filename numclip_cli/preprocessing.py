"""What an image goes through before the model, as a checkpoint stores it: open_clip's preprocessing settings
(size, mean, std, interpolation, resize mode) and the face crop (mode and margin).

``train`` writes it into the checkpoint's ``preprocess`` metadata, and ``predict``/``calibrate`` rebuild the
exact same transform from it. Checkpoints written before this field existed fall back to what numclip did
then: the backbone's own open_clip preprocessing, the task's face mode and the training margin.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from numclip_cli.faces import DEFAULT_MARGIN, ONE_VIEW_MODES

IMAGE_KEYS = {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "longest", "squash")
MAX_FACE_MARGIN = 10.0
# Normalisation of pixels in [0, 1]: every open_clip model's values lie far inside these (CLIP: mean ≈ 0.45, std
# ≈ 0.27); beyond them a stored value can only blow the image tower's input up to inf/NaN.
MAX_MEAN = 10.0
STD_RANGE = (1e-3, 10.0)


@dataclass(frozen=True)
class Preprocessing:
    """open_clip's preprocess config plus the face crop applied before it."""

    image: dict[str, Any] = field(default_factory=dict)
    faces: str = "none"
    face_margin: float = DEFAULT_MARGIN

    @property
    def size(self) -> tuple[int, int]:
        """Input height and width of the image tower."""
        size = self.image["size"]
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def transform(self) -> Callable:
        """The evaluation transform (PIL image → normalised tensor), exactly as open_clip builds it."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.image), is_train=False)

    def to_metadata(self) -> dict[str, Any]:
        """Plain JSON data for the checkpoint."""
        image = {key: list(value) if isinstance(value, tuple) else value for key, value in self.image.items()}
        return {"image": image, "faces": self.faces, "face_margin": self.face_margin}

    @classmethod
    def from_metadata(cls, data: Any) -> Preprocessing:
        """Validate stored settings (``ValueError`` naming the field): only values open_clip supports, numbers in
        sane ranges, and nothing that is a path."""
        if not isinstance(data, dict) or set(data) - {"image", "faces", "face_margin"}:
            raise ValueError("preprocess must hold image, faces and face_margin")
        image = data.get("image")
        if not isinstance(image, dict) or set(image) - IMAGE_KEYS or not {"size", "mean", "std"} <= set(image):
            raise ValueError(f"preprocess.image must hold size, mean and std (allowed: {sorted(IMAGE_KEYS)})")
        size = image["size"]
        sides = [size] if isinstance(size, int) else size if isinstance(size, list) and len(size) == 2 else None
        if not sides or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 4096 for s in sides):
            raise ValueError("preprocess.image.size must be a positive integer or [height, width]")
        for key, (low, high) in (("mean", (-MAX_MEAN, MAX_MEAN)), ("std", STD_RANGE)):
            values = image[key]
            if not (isinstance(values, list) and len(values) == 3
                    and all(_number(v) and low <= v <= high for v in values)):
                raise ValueError(f"preprocess.image.{key} must be three finite numbers" +
                                 (" above 0" if key == "std" else "") + f" (from {low:g} to {high:g})")
        for key, allowed in (("mode", ("RGB",)), ("interpolation", INTERPOLATIONS), ("resize_mode", RESIZE_MODES)):
            if key in image and image[key] not in allowed:
                raise ValueError(f"preprocess.image.{key} must be one of {', '.join(allowed)}")
        fill = image.get("fill_color", 0)
        if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
            raise ValueError("preprocess.image.fill_color must be an integer 0-255")
        faces, margin = data.get("faces", "none"), data.get("face_margin", DEFAULT_MARGIN)
        if faces not in ONE_VIEW_MODES:
            raise ValueError(f"preprocess.faces must be one of {', '.join(ONE_VIEW_MODES)}")
        if not (_number(margin) and 0 <= margin <= MAX_FACE_MARGIN):
            raise ValueError(f"preprocess.face_margin must be a number from 0 to {MAX_FACE_MARGIN:g}")
        return cls(image=dict(image), faces=faces, face_margin=float(margin))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
