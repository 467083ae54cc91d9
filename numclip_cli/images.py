"""Safe image decoding: any file in, an upright RGB image or a one-line ``ImageLoadError`` out.

``load_rgb`` is the only door from disk to pixels. Folders of phone, scanner and web photos hold every kind of
oddity (alpha, 16-bit scans, CMYK, EXIF rotation, animations, truncated downloads, mislabelled text files,
decompression bombs), and one bad file must become one error record, never a crash or a hang of the pipeline.

How it stays bounded: only regular files are opened (a FIFO or device could block forever), the pixel count
from the header is checked before any pixel is decoded, Pillow's decompression-bomb warning is an error while
decoding, and only the first frame of an animated or multi-page image is ever decoded. The pixel limit alone
does not bound what comes *after* decoding: a model transform resizes the short side to the model's input size
first, so a 600000x1 strip (661 bytes as a PNG) would be upscaled to a 600000-times-wider intermediate (12 GB).
An image longer than ``MAX_ASPECT_RATIO`` times its short side is therefore cut down to its centre part of that
aspect ratio, which bounds every later resize by ``MAX_ASPECT_RATIO`` x (model input side)^2 pixels. The models'
transforms keep only the central square anyway, so the prediction stays the one of the whole image.
"""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from numclip_cli.errors import one_line

# Pillow's own default for Image.MAX_IMAGE_PIXELS (~89.5 MP: a 24-bit 256 MiB image); not read from the
# module at import time because callers may change that global.
DEFAULT_MAX_PIXELS = 89_478_485
# Longest side / shortest side beyond which only the centre is kept (see the module docstring). Phone panoramas
# stay below ~10:1, so ordinary photos are never cut; 20 x 224^2 px is 3 MB of RGB for ViT-B-16.
MAX_ASPECT_RATIO = 20
# The only Pillow decoders ever asked to read a file: raster formats decoded in-process. Without the list, Pillow
# tries every plugin it has, and its EPS plugin hands a PostScript file (whatever its name) to Ghostscript, a
# program that interprets code. JPEG's opener also reads the multi-picture JPEGs (MPO) many phones write.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "TGA")

_WHITE = (255, 255, 255, 255)
_UINT16_MAX = 65535


class ImageLoadError(Exception):
    """An image that cannot be decoded; its message is a short one-line reason for the error record."""

    def __init__(self, reason: str) -> None:
        # Error records are one line each (JSONL, CSV), so no newline may ever get through.
        super().__init__(one_line(reason, limit=None))


def load_rgb(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode the first frame of an image file, upright per EXIF, as RGB; raise ImageLoadError otherwise."""
    _check_regular_file(path)
    try:
        # catch_warnings restores the process-wide filters on exit; it is not thread-safe before Python 3.14,
        # so decode in worker processes rather than threads.
        with warnings.catch_warnings():
            # Pillow warns about damaged metadata (EXIF, TIFF tags) it skips; the image either decodes or
            # raises, and one stderr line per odd photo would bury a pipeline's output. This also drops
            # Pillow's header-time bomb warning: the check below replaces it, names W x H and honours a
            # max_pixels above Pillow's limit (Pillow itself still refuses anything above twice its limit).
            warnings.simplefilter("ignore")
            with Image.open(path, formats=FORMATS) as im:
                _check_size(im.size, max_pixels)
                # Past the header, a bomb warning (e.g. an oversized TIFF tile or GIF disposal area) is fatal.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                # Decode now, inside the guard: truncated or corrupt data only raises when pixels are read.
                im.load()
                upright = centre_within_aspect(ImageOps.exif_transpose(im))
                try:
                    return _to_rgb(upright)
                except ValueError as e:
                    raise ImageLoadError(f"unsupported image mode {upright.mode}") from e
    except ImageLoadError:
        raise
    except FileNotFoundError as e:  # vanished since the stat, or a symlink to nowhere
        raise ImageLoadError("no such file") from e
    except IsADirectoryError as e:
        raise ImageLoadError("is a directory") from e
    except PermissionError as e:
        raise ImageLoadError("permission denied") from e
    except Image.UnidentifiedImageError as e:
        raise ImageLoadError(f"not a recognised image format (numclip reads {', '.join(FORMATS)})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"image too large: {e}") from e
    except MemoryError as e:
        raise ImageLoadError("image too large: out of memory while decoding") from e
    except Exception as e:
        # Hostile bytes make Pillow's decoders raise almost anything (OSError, SyntaxError, ValueError,
        # struct.error, EOFError, IndexError, ZeroDivisionError ...); each is one bad file, never a crash.
        # The cause stays chained for --verbose tracebacks.
        raise ImageLoadError("truncated or corrupt image data") from e


def _check_regular_file(path: str | os.PathLike[str]) -> None:
    """Reject what is not a non-empty regular file before Pillow opens it."""
    try:
        st = os.stat(path)  # follows symlinks, so a dangling one is "no such file"
    except FileNotFoundError as e:
        raise ImageLoadError("no such file") from e
    except PermissionError as e:
        raise ImageLoadError("permission denied") from e
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ImageLoadError(f"cannot read file: {getattr(e, 'strerror', None) or e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError("is a directory")
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO with no writer blocks forever and a device can stream endlessly.
        raise ImageLoadError("not a regular file")
    if st.st_size == 0:
        raise ImageLoadError("empty file")


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    """Reject absurd dimensions from the header, before any pixel is decoded."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"invalid image size: {width}x{height}")
    if width * height > max_pixels:
        raise ImageLoadError(f"image too large: {width}x{height} pixels exceeds limit {max_pixels}")


def centre_within_aspect(im: Image.Image, max_ratio: int = MAX_ASPECT_RATIO) -> Image.Image:
    """The image itself, or its centre part of aspect ratio ``max_ratio`` when its long side is longer."""
    width, height = im.size
    if width > height * max_ratio:
        left, right = _centre_span(width, height * max_ratio)
        return im.crop((left, 0, right, height))
    if height > width * max_ratio:
        top, bottom = _centre_span(height, width * max_ratio)
        return im.crop((0, top, width, bottom))
    return im


def _centre_span(length: int, keep: int) -> tuple[int, int]:
    """Start and end of the middle ``keep`` (or ``keep + 1``) of ``length`` pixels, centred exactly."""
    keep += (length - keep) % 2  # same parity as the whole: the part's centre is the image's centre
    start = (length - keep) // 2
    return start, start + keep


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha onto white, high bit depths scaled by their real range."""
    if im.mode == "I" or im.mode.startswith("I;16") or im.mode == "F":
        # 16/32-bit transparency (a tRNS grey level) is rare in photos and dropped here.
        return _scale_to_8bit(im).convert("RGB")
    if im.has_transparency_data:
        # RGBA, LA, PA, RGBa, and P/L/RGB with info['transparency']: Pillow's RGBA conversion applies the
        # palette alpha or transparent colour; compositing on white keeps transparent areas from going black.
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    # 1, L, P, RGBX, CMYK, YCbCr, LAB, HSV: Pillow's own conversions are correct for these.
    return im.convert("RGB")


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float image to 8-bit grey ('L') by the range its values really use.

    Integer modes are treated as 16-bit when every value fits (the usual 16-bit PNG/TIFF scan, so 65535 is
    white whatever the image holds, and dark scans stay dark); larger values are scaled by the maximum.
    Negative values clip to black. Float images are taken as 0-1 when the maximum is at most 1, else min-max
    stretched (black if constant); NaN and infinities become 0.
    """
    # float32 halves the memory of float64 and is exact for 16-bit values.
    values = np.asarray(im, dtype=np.float32)
    if im.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        high = float(values.max())
        low = float(values.min())
        if high <= 1.0:
            scaled = values * 255.0
        elif high > low:
            scaled = (values - low) * (255.0 / (high - low))
        else:  # a constant image above 1 has no range to stretch
            scaled = np.zeros_like(values)
    else:
        high = float(values.max())
        scaled = values / 257.0 if high <= _UINT16_MAX else values * (255.0 / high)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
