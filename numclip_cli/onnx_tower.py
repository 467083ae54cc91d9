"""``predict --fast`` on the CPU: the image tower as an int8 ONNX Runtime session (the optional ``numclip[fast]``).

open_clip's image tower is exported to ONNX (dynamic batch) and every matrix product with a constant weight is
quantised to int8 with per-batch activation scales (``onnxruntime.quantization.quantize_dynamic``): the
attention's in-projection included, which torch's ``quantize_dynamic`` left in fp32 because
``nn.MultiheadAttention`` keeps it as a bare parameter, not an ``nn.Linear``. What was measured against the
alternatives (torchao int8, fp32 ONNX Runtime, bf16) is in docs/performance.md.

Export and quantisation take seconds to tens of seconds for ViT-B-16, so the quantised model is kept in the user
cache folder (``cache_home()/onnx``), named by a hash of the tower's weights, input size and the versions that
shape the file; a file that does not load is rebuilt. Without a writable cache folder it lives for one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from numclip_cli.errors import UsageError
from numclip_cli.feature_cache import cache_home, weights_digest

NEEDS_EXTRA = "--fast needs numclip[fast]: pip install 'numclip[fast]' (onnxruntime and onnx)"
OPSET = 17
# One int8 scale per output channel of every weight matrix: on a ViT-B-16 with a trained numclip head it kept the
# fp32 bin of 88/88 photos where one scale per matrix kept 87/88 (the one changed had a 0.0003 top-2 margin),
# at the same speed.
PER_CHANNEL = True


def fast_available() -> bool:
    """Whether ``numclip[fast]`` (onnxruntime and onnx) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def saturating_int8() -> bool:
    """Whether this CPU's int8 matrix products can saturate: x86 without VNNI (AVX2, AVX-512F) multiplies uint8
    activations by int8 weights with VPMADDUBSW, whose 16-bit sums of pairs overflow for large weights. There the
    weights are quantised to 7 bits (ONNX Runtime's ``reduce_range``): on an AMD EPYC with AVX2 only, 8-bit weights
    kept the fp32 bin of 265/300 images of the shipped demo, 7-bit weights 296/300. VNNI CPUs (and ARM) have no
    such overflow and keep 8 bits. A CPU whose flags cannot be read counts as saturating: 7 bits are safe on all."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return True
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def require_fast_extra() -> None:
    """Fail with the install hint when onnxruntime or onnx is missing."""
    if not fast_available():
        raise UsageError(NEEDS_EXTRA)


class OnnxImageTower:
    """An int8 ONNX Runtime session standing in for ``clip.visual``: preprocessed images → features (B×D)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # the same budget as torch's (OMP_NUM_THREADS, set_num_threads)
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch of float32 images (the CPU)."""
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])


def int8_image_tower(visual: torch.nn.Module, image_size: int, cache: Path | None = None) -> OnnxImageTower:
    """The int8 ONNX Runtime session of an open_clip image tower, from ``cache`` (default: the user cache folder)
    when it was built before, else exported and quantised now (and kept there)."""
    require_fast_extra()
    import onnxruntime

    threads = torch.get_num_threads()
    identity = (f"{weights_digest(visual)}:{image_size}:{torch.__version__}:{onnxruntime.__version__}:{OPSET}:"
                f"{PER_CHANNEL}:{saturating_int8()}")
    name = hashlib.sha256(identity.encode()).hexdigest()[:32] + ".int8.onnx"
    folder = cache if cache is not None else cache_home() / "onnx"
    path = folder / name
    if path.is_file():
        with contextlib.suppress(Exception):  # damaged or from an incompatible build: rebuilt below
            return OnnxImageTower(path, threads)
    with tempfile.TemporaryDirectory(prefix="numclip-onnx-") as scratch:
        built = Path(scratch) / name
        _export_int8(visual, image_size, built)
        tower = OnnxImageTower(built, threads)  # the session holds the model: the file may go
        _keep(built, path)
    return tower


def _keep(built: Path, path: Path) -> None:
    """Copy the built file into the cache (temp file + rename); a cache that cannot be written is skipped."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(built.read_bytes())
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _export_int8(visual: torch.nn.Module, image_size: int, target: Path) -> None:
    """Export ``visual`` to ONNX in fp32, then quantise its constant-weight matrix products to int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = target.with_suffix(".fp32.onnx")
    example = torch.zeros(1, 3, image_size, image_size)
    was_training = visual.training
    visual.eval()
    # The TorchScript exporter warns about every Python-level shape check it traces through, and the quantiser
    # logs advice on the root logger: the graph is checked by the agreement tests instead (tests/test_fast.py).
    logging.disable(logging.WARNING)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel has no ONNX export: trace the plain operations
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(visual, (example,), str(fp32), input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=OPSET,
                              dynamo=False)
            quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=PER_CHANNEL,
                             reduce_range=saturating_int8())
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        logging.disable(logging.NOTSET)
        visual.train(was_training)
    fp32.unlink()
