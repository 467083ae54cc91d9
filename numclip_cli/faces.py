"""Optional face detection and square face crops, so age runs on the face of an everyday photo (``numclip[face]``).

``--faces largest`` (the ``age`` task's default) crops the largest face, ``--faces all`` predicts every face; with no
face found the whole image is used and the record says so (``"face": null``). The detector is OpenCV's Haar
``frontalface_alt2`` cascade (scaleFactor 1.1, minNeighbors 5), chosen over four other cascades and MTCNN in a
measured study: docs/faces.md. Detection runs on a grey copy at most ``DETECT_MAX_SIDE`` pixels long, so its cost is
bounded whatever the photo size; boxes are mapped back to the original (EXIF-upright) image.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image

from numclip_cli.errors import UsageError

FACE_MODES = ("none", "largest", "all")
ONE_VIEW_MODES = FACE_MODES[:2]  # one image per input: what training and task specs accept
# IMDB-WIKI/DEX and the age benchmarks that followed add 40 % of the face size on every side
DEFAULT_MARGIN = 0.4
EXTRA = "numclip[face]"
CASCADE = "haarcascade_frontalface_alt2.xml"
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5
DETECT_MAX_SIDE = 640
MIN_FACE = 24  # pixels at detection scale; the cascade's window is 20 px


class Box(NamedTuple):
    """A face in original-image pixels: left, top, width, height."""

    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        """Pixels covered; the largest face comes first."""
        return self.w * self.h


class FaceDetector(Protocol):
    """Anything that finds faces in an upright RGB image."""

    def detect(self, image: Image.Image) -> list[Box]:
        """Faces in original-image pixels, largest first."""
        ...


def require_opencv() -> Any:
    """The ``cv2`` module with ``CascadeClassifier``; a usage error naming the extra otherwise."""
    try:
        import cv2
    except ImportError as exc:
        raise UsageError(f"face detection needs OpenCV 4 ({exc}): install {EXTRA}") from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise UsageError(f"face detection needs OpenCV 4 (OpenCV {cv2.__version__} has no CascadeClassifier): "
                         f"install {EXTRA}, which pins opencv-python-headless<5")
    return cv2


def face_detection_available() -> bool:
    """Whether ``require_opencv`` would succeed."""
    try:
        require_opencv()
    except UsageError:
        return False
    return True


class HaarDetector:
    """OpenCV's frontal-face Haar cascade from ``cv2.data.haarcascades`` (shipped in the wheel)."""

    def __init__(self, cascade: str = CASCADE, scale_factor: float = SCALE_FACTOR,
                 min_neighbors: int = MIN_NEIGHBORS) -> None:
        cv2 = require_opencv()
        self.path = cv2.data.haarcascades + cascade
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors
        self._cascade: Any = None  # loaded in the process that detects (a DataLoader worker)

    def __getstate__(self) -> dict[str, Any]:
        # cv2 objects cannot be pickled for spawn-started workers; each process loads its own cascade
        return {**self.__dict__, "_cascade": None}

    def _classifier(self) -> Any:
        if self._cascade is None:
            cv2 = require_opencv()
            # parallelism comes from the DataLoader workers; OpenCV's own thread pool would oversubscribe the
            # cores and does not survive the fork that starts a worker
            cv2.setNumThreads(1)
            cascade = cv2.CascadeClassifier(self.path)
            if cascade.empty():
                raise UsageError(f"cannot load the face cascade {self.path}: reinstall {EXTRA}")
            self._cascade = cascade
        return self._cascade

    def detect(self, image: Image.Image) -> list[Box]:
        """Faces in original-image pixels, largest first (ties: top to bottom, left to right)."""
        scale = min(1.0, DETECT_MAX_SIDE / max(image.size))
        grey = image.convert("L")
        if scale < 1.0:
            grey = grey.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                               Image.Resampling.BILINEAR)
        found = self._classifier().detectMultiScale(np.asarray(grey), scaleFactor=self.scale_factor,
                                                    minNeighbors=self.min_neighbors, minSize=(MIN_FACE, MIN_FACE))
        boxes = [_to_original(tuple(int(v) for v in row), scale, image.size) for row in found]
        return sorted(boxes, key=lambda b: (-b.area, b.y, b.x))


def _to_original(box: tuple[int, ...], scale: float, size: tuple[int, int]) -> Box:
    x, y, w, h = (round(v / scale) for v in box)
    x, y = min(max(x, 0), size[0] - 1), min(max(y, 0), size[1] - 1)
    return Box(x, y, min(w, size[0] - x), min(h, size[1] - y))


@functools.cache
def default_detector() -> FaceDetector:
    """The detector numclip uses (see the module docstring for why), one per process."""
    return HaarDetector()


def detect(image: Image.Image, detector: FaceDetector | None = None) -> list[Box]:
    """Faces in an upright RGB image (as ``images.load_rgb`` returns it), in its pixels, largest first."""
    return (detector or default_detector()).detect(image)


def crop(image: Image.Image, box: Box, margin: float = DEFAULT_MARGIN) -> Image.Image:
    """The square ``crop_square`` chooses around a face."""
    return image.crop(crop_square(box, image.size, margin))


def crop_square(box: Box, size: tuple[int, int], margin: float = DEFAULT_MARGIN) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a square around ``box``, ``margin`` × its size added on every side.

    At a border the square slides inwards (the face stays whole, only less centred) and it shrinks to the
    image's shorter side when it would not fit: no padding, so the model never sees bars that are not in the
    photo.

    >>> crop_square(Box(100, 100, 50, 50), (400, 300))
    (80, 80, 170, 170)
    >>> crop_square(Box(0, 250, 50, 50), (400, 300))
    (0, 210, 90, 300)
    """
    if margin < 0:
        raise UsageError(f"--face-margin must be at least 0, got {margin:g}")
    width, height = size
    side = min(round(max(box.w, box.h) * (1 + 2 * margin)), width, height)
    left = min(max(round(box.x + box.w / 2 - side / 2), 0), width - side)
    top = min(max(round(box.y + box.h / 2 - side / 2), 0), height - side)
    return left, top, left + side, top + side


class FaceCrops:
    """An image → the views the model sees: the largest face, every face, or the whole image when none is found.

    Each view comes with the fields it adds to its record: ``{"face": {"index": i, "count": n, "box": [x, y, w,
    h]}}`` (face i of the n this input gives), or ``{"face": None}`` for the whole image of a photo without a
    detected face.
    """

    def __init__(self, mode: str, margin: float = DEFAULT_MARGIN, detector: FaceDetector | None = None) -> None:
        if mode not in FACE_MODES[1:]:
            raise ValueError(f"face crops need mode 'largest' or 'all', got {mode!r}")
        self.mode, self.margin = mode, margin
        self.detector = detector or default_detector()

    def __call__(self, image: Image.Image) -> list[tuple[Image.Image, dict[str, Any]]]:
        """The views of one image with their record fields."""
        boxes = self.detector.detect(image)
        if not boxes:
            return [(image, {"face": None})]
        chosen = boxes[:1] if self.mode == "largest" else boxes
        return [(crop(image, box, self.margin), {"face": {"index": i, "count": len(chosen), "box": list(box)}})
                for i, box in enumerate(chosen)]

    def first(self, image: Image.Image) -> Image.Image:
        """The single view training uses: the largest face, or the whole image."""
        return self(image)[0][0]


def resolve_mode(requested: str | None, default: str, allowed: Sequence[str] = FACE_MODES) -> tuple[str, str | None]:
    """The face mode to run and a warning, if any.

    An explicit ``--faces`` must be one of ``allowed`` and, unless ``none``, needs the extra (else a usage
    error). The task's default falls back to whole images with a warning when the extra is missing, so
    ``numclip predict photo.jpg --task age`` works on a plain install.
    """
    if requested is None:
        if default == "none" or face_detection_available():
            return default, None
        return "none", (f"the task crops faces by default (--faces {default}) but {EXTRA} is not installed: "
                        f"using whole images (install {EXTRA}, or pass --faces none)")
    if requested not in allowed:
        raise UsageError(f"--faces {requested!r}: choose one of {', '.join(allowed)}")
    if requested != "none":
        require_opencv()
    return requested, None


def face_crops(mode: str, margin: float = DEFAULT_MARGIN) -> FaceCrops | None:
    """The per-image views for ``mode`` (None: the whole image, nothing detected)."""
    return None if mode == "none" else FaceCrops(mode, margin)


def face_transform(mode: str, margin: float, transform: Callable) -> Callable:
    """``transform`` preceded by the largest-face crop (training and calibration: one view per image)."""
    if mode == "none":
        return transform
    from torchvision import transforms

    return transforms.Compose([FaceCrops(mode, margin).first, transform])
