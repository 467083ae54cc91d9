"""The real-photo ordinal suite: crops of photographs that ship with scikit-image, labelled by haze level.

The label (1–10) is how much haze veils the photo: level ``k`` keeps ``contrast(k)`` = 0.9^(k−1) of the photo's
contrast (1.0 … 0.39) and fills the rest with a light grey veil, ``pixel·c + veil·(1−c)``, as fog or a washed-out
lens would. Steps are geometric because contrast is judged relative to what is there: each step takes the same
10 % away. Unlike the drawn suites the picture under the label is real (textures, edges, flat sky, text,
microscopy, astronomy, in colour and grey) and the label is not always certain: a photograph that is low in
contrast to begin with (the clock, the moon, cells) looks hazy at level 1, as it would to a person.

Why haze: additive Gaussian noise (σ 2–47 grey levels, ×1.42 per step) was tried first. With the sanity recipe
(numclip-tiny from random init, 540 training crops, 6 epochs, tuned image tower and context) the model did not
learn it at all (validation MAE 2.31 against 2.38 for predicting the median), while the same recipe on haze
reached 1.25 on validation crops and 1.64 on 300 crops of the test photographs (median: 2.51; per photograph
from 0.82 on chelsea to 2.3 on page and 3.0 on the low-contrast clock), and on ``dots`` 0.89. The
likely reason: the ViT normalises each patch token, so a random-init model picks up how bright patches are
(haze lifts the darkest ones) long before it learns the within-patch texture energy that noise, blur or JPEG
quality would need.

Photographs are assigned to a split once, by name, independent of any seed, so a model tested on ``test``
has never seen those photographs during training:

- ``train`` (13): astronaut, coffee, hubble_deep_field, immunohistochemistry, retina (colour); brick, camera,
  cell, coins, grass, microaneurysms, moon, text (grey).
- ``test`` (6): chelsea (the cat), motorcycle (left view of ``stereo_motorcycle``), rocket (colour); clock,
  gravel, page (grey).

Pairs of similar content are split on purpose (grass/gravel, text/page, hubble/rocket's night sky, astronaut/
chelsea, cell/clock's flat grey), so the test set is new photographs of familiar kinds, not a new domain. Left
out: ``cat`` (the same picture as ``chelsea``), ``colorwheel``, ``logo``, ``horse``, ``checkerboard`` (drawn
graphics, flat crops) and the datasets scikit-image must download.

Each image is a random square crop (15–60 % of the photo's short side, at least the output size, so nothing is
upsampled) resized to the output size, turned a random quarter turn and mirrored half the time, and hazed with
a veil of random grey level (215–255), so no two crops repeat and the model must read the haze rather than
recognise the crop. All randomness is drawn before the label is used: one seed gives the same crop and veil at
every level, only the contrast differs.

scikit-image is an optional dependency (``numclip[photos]``); it is imported only when a photo is needed.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from numclip_cli.errors import UsageError

EXTRA = "numclip[photos]"
TRAIN_PHOTOS = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
                "brick", "camera", "cell", "coins", "grass", "microaneurysms", "moon", "text")
TEST_PHOTOS = ("chelsea", "motorcycle", "rocket", "clock", "gravel", "page")
SPLITS: dict[str, tuple[str, ...]] = {"train": TRAIN_PHOTOS, "test": TEST_PHOTOS}
LEVELS = range(1, 11)
_CONTRAST_STEP = 0.9
_VEIL = (215.0, 255.0)  # grey level of the haze veil, drawn per image
_CROP_SHARE = (0.15, 0.6)  # crop side as a share of the photo's short side


def contrast(level: int) -> float:
    """Share of the photo's contrast left at ``level``: 1 at level 1, ×0.9 per step.

    >>> contrast(1), round(contrast(10), 3)
    (1.0, 0.387)
    """
    return _CONTRAST_STEP ** (level - 1)


def require_skimage() -> Any:
    """The ``skimage.data`` module; a one-line usage error naming the extra when scikit-image is missing."""
    try:
        import skimage.data
    except ImportError:
        raise UsageError(f"the photo suite needs scikit-image: install {EXTRA}") from None
    return skimage.data


@cache
def load_photo(name: str) -> np.ndarray:
    """Photograph ``name`` as a read-only H×W×3 uint8 array (grey photos repeated over the channels)."""
    data = require_skimage()
    pixels = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    pixels = np.asarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    pixels.setflags(write=False)
    return pixels


def _crop(photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of ``photo``, resized (area-averaged) to ``size``×``size``, as float32."""
    height, width = photo.shape[:2]
    short = min(height, width)
    low = min(short, max(size, round(_CROP_SHARE[0] * short)))
    side = int(rng.integers(low, max(low, round(_CROP_SHARE[1] * short)) + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.Resampling.BOX)
    return np.asarray(crop, dtype=np.float32)


def paint(label: int, rng: np.random.Generator, size: int, split: str) -> Image.Image:
    """A ``size``×``size`` RGB crop of a ``split`` photograph with haze level ``label``."""
    names = SPLITS[split]
    pixels = _crop(load_photo(names[int(rng.integers(len(names)))]), rng, size)
    pixels = np.rot90(pixels, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    veil = rng.uniform(*_VEIL)  # drawn whatever the label: one seed gives the same crop at every level
    c = contrast(label)
    return Image.fromarray(np.clip(np.rint(pixels * c + veil * (1 - c)), 0, 255).astype(np.uint8), "RGB")
