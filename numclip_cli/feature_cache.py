"""On-disk cache of image features from a frozen image tower, so a second run on the same images (another
method, another learning rate, another calibration) skips the image tower.

Layout: ``ROOT/<encoder key>/<ab>/<sha256 of the image file>.safetensors``, one float32 vector per file. The
encoder key is a SHA-256 over everything that shapes a feature besides the image bytes: the image tower's
weights (hashed once per run), open_clip's preprocessing settings, the face crop (mode and margin), the
``--precision``, and the numclip version (which fixes decoding and cropping code). A change in any of them
selects another folder, so stale entries are never looked up. An entry is still checked when read (its
metadata names the same key and file hash, one finite float32 vector of the tower's width): a damaged entry is
ignored and rewritten, never trusted.

Only deterministic views are cached: the evaluation preprocessing, never the random crop/flip of training.
A frozen image tower therefore trains on the features of the evaluation view (see the trainer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from numclip_cli import __version__

FORMAT = "1"
FORMAT_KEY = "numclip.features"
TENSOR = "features"
_CHUNK = 1 << 20
# An image file larger than this is not cached, so hashing it never reads more: an image within the decoder's
# pixel limit is far smaller (89.5 million pixels of uncompressed 16-bit RGBA are 0.7 GiB).
MAX_CACHED_FILE_BYTES = 1 << 30


def cache_home() -> Path:
    """numclip's folder in the user cache: ``$XDG_CACHE_HOME/numclip`` (``~/.cache/numclip``) on Linux,
    ``~/Library/Caches/numclip`` on macOS, ``%LOCALAPPDATA%\\numclip`` on Windows."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "numclip"


def default_cache_dir() -> Path:
    """The default root of the feature cache (``--cache-dir``): ``cache_home() / "features"``."""
    return cache_home() / "features"


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every tensor)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def file_digest(path: str) -> str | None:
    """SHA-256 of a regular file's bytes; None when the path is not a regular file, is larger than
    ``MAX_CACHED_FILE_BYTES`` or cannot be read (the image loader then reports why, or decodes it uncached).

    Like the image loader, it never blocks on or streams from a FIFO or device: the file is opened non-blocking
    and its type and size are checked on the opened descriptor before a byte is read.
    """
    try:
        handle = open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    with handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CACHED_FILE_BYTES:
            return None
        digest, left = hashlib.sha256(), MAX_CACHED_FILE_BYTES + 1  # a file growing meanwhile is cut off
        try:
            while left and (chunk := handle.read(min(_CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
        except OSError:
            return None
    return digest.hexdigest() if left else None


@dataclass
class FeatureCache:
    """The cache entries of one encoder (image tower + preprocessing + precision) under a root folder."""

    folder: Path
    key: str
    dim: int  # width of the image tower's features: an entry of another width is damaged
    hits: int = 0
    stored: int = 0
    rejected: int = 0  # entries found but damaged (rebuilt)
    writable: bool = True  # turned off after the first failed write: the run goes on without storing

    @classmethod
    def open(cls, root: str | Path, image_tower: torch.nn.Module, dim: int, settings: dict[str, Any]) -> FeatureCache:
        """The cache of ``image_tower`` with ``settings`` (preprocessing, faces, precision) under ``root``."""
        identity = {"format": FORMAT, "numclip": __version__, "weights": weights_digest(image_tower), **settings}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        return cls(Path(root) / key[:32], key, dim)

    @classmethod
    def for_model(cls, root: str | Path, model: Any, preprocess_cfg: dict[str, Any], faces: str, face_margin: float,
                  precision: str) -> FeatureCache:
        """The cache of an ``OrdinalModel``'s image tower fed with these preprocessing, face and precision settings."""
        settings = {"preprocess": preprocess_cfg, "faces": faces, "precision": precision,
                    "face_margin": None if faces == "none" else face_margin}
        return cls.open(root, model.clip.visual, model.embed_dim, settings)

    def entry(self, digest: str) -> Path:
        """Where the features of the image whose bytes hash to ``digest`` live."""
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def load(self, digest: str) -> torch.Tensor | None:
        """The cached features of an image, or None (absent, or damaged: then it counts as rejected)."""
        from safetensors import safe_open

        path = self.entry(digest)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                features = handle.get_tensor(TENSOR)
        except Exception:  # truncated, not safetensors, no such tensor: rebuilt like any damaged entry
            features, meta = None, {}
        if (features is None or meta.get(FORMAT_KEY) != FORMAT or meta.get("key") != self.key
                or meta.get("file") != digest or features.dtype != torch.float32
                or tuple(features.shape) != (self.dim,) or not torch.isfinite(features).all()):
            self.rejected += 1
            return None
        self.hits += 1
        return features

    def store(self, digest: str, features: torch.Tensor) -> None:
        """Write one entry (temp file + rename: a reader never sees half of it); a failed write turns storing off."""
        from safetensors.torch import save

        if not self.writable:
            return
        path = self.entry(digest)
        data = save({TENSOR: features.detach().to("cpu", torch.float32).contiguous()},
                    metadata={FORMAT_KEY: FORMAT, "key": self.key, "file": digest})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{digest[:8]}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            self.writable = False
            return
        self.stored += 1


Encode = Callable[[torch.Tensor], torch.Tensor]  # a batch of preprocessed images → their features (B×D)


def image_features(paths: Sequence[str], transform: Callable, encode: Encode, cache: FeatureCache | None,
                   batch_size: int, workers: int) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Features (float32, on the CPU) of every readable image by its index in ``paths``: from ``cache`` where it
    holds them, the rest encoded in batches (and stored); and why each other image could not be used."""
    from numclip_cli.decoding import batches

    found: dict[int, torch.Tensor] = {}
    errors: dict[int, str] = {}
    digests: list[str | None] = [None] * len(paths)
    if cache is not None:
        for index, path in enumerate(paths):
            digests[index] = file_digest(path)
            features = cache.load(digests[index]) if digests[index] else None
            if features is not None:
                found[index] = features
    todo = [index for index in range(len(paths)) if index not in found]
    for batch in batches([paths[i] for i in todo], transform, batch_size, workers):
        errors.update({todo[position]: error for position, error in batch.errors.items()})
        if batch.images is None:
            continue
        encoded = encode(batch.images).float().cpu()
        for row, position in enumerate(i for i in batch.indices if i not in batch.errors):
            index = todo[position]
            found[index] = encoded[row]
            if cache is not None and digests[index]:
                cache.store(digests[index], encoded[row])
    return found, errors
