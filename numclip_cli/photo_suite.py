"""The real-photo ordinal suite: crops of photographs that ship with scikit-image, labelled by added noise.

The label (1–10) is the strength of added Gaussian noise: level ``k`` adds noise of standard deviation
``noise_sigma(k)`` = 2 × 1.42^(k−1) grey levels (2 … 47 on the 0–255 scale), independently per pixel and
channel. Steps are geometric because noise is judged relative to what is already there: each step is the
same ×1.42 whether the image is almost clean or very noisy. Unlike the drawn suites, the picture under the
label is real: textures, edges, flat sky, text, microscopy and astronomy, in colour and grey.

Photographs are assigned to a split once, by name, independent of any seed, so a model tested on ``test``
has never seen those photographs during training:

- ``train`` (13): astronaut, coffee, hubble_deep_field, immunohistochemistry, retina (colour); brick, camera,
  cell, coins, grass, microaneurysms, moon, text (grey).
- ``test`` (6): chelsea (the cat), motorcycle (left view of ``stereo_motorcycle``), rocket (colour); clock,
  gravel, page (grey).

Pairs of similar content are split on purpose (grass/gravel, text/page, hubble/rocket's night sky, astronaut/
chelsea), so the test set is new photographs of familiar kinds, not a new domain. Left out: ``cat`` (the same
picture as ``chelsea``), ``colorwheel``, ``logo``, ``horse``, ``checkerboard`` (drawn graphics, flat crops) and
the datasets scikit-image must download.

Each image is a random square crop (15–60 % of the photo's short side, at least the output size, so nothing is
upsampled) resized to the output size, then lightly augmented (a random quarter turn and mirror, contrast
×0.8–1.25 and brightness ±15 grey levels) before the noise is added, so no two crops repeat and the model must
read the noise rather than recognise the crop. All randomness is drawn before the label is used: one seed
gives the same crop at every level, only the noise strength differs.

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
_SIGMA_1, _SIGMA_STEP = 2.0, 1.42
_CROP_SHARE = (0.15, 0.6)  # crop side as a share of the photo's short side
_CONTRAST = (0.8, 1.25)
_BRIGHTNESS = 15.0


def noise_sigma(level: int) -> float:
    """Standard deviation (grey levels, 0–255 scale) of the noise added at ``level``.

    >>> round(noise_sigma(1), 2), round(noise_sigma(10), 1)
    (2.0, 47.0)
    """
    return _SIGMA_1 * _SIGMA_STEP ** (level - 1)


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
    """A ``size``×``size`` RGB crop of a ``split`` photograph with noise level ``label`` added."""
    names = SPLITS[split]
    pixels = _crop(load_photo(names[int(rng.integers(len(names)))]), rng, size)
    pixels = np.rot90(pixels, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    contrast, brightness = rng.uniform(*_CONTRAST), rng.uniform(-_BRIGHTNESS, _BRIGHTNESS)
    pixels = (pixels - pixels.mean()) * contrast + pixels.mean() + brightness
    noise = rng.standard_normal(pixels.shape, dtype=np.float32)  # drawn whatever the label: same crop per seed
    noisy = np.clip(pixels, 0, 255) + noise_sigma(label) * noise
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")
