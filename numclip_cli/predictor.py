"""Batched, streaming inference: decode in DataLoader workers, run the model under ``inference_mode`` with text
features computed once, and yield one record per input, in input order."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from numclip_cli.calibration import ConformalRule
from numclip_cli.images import ImageLoadError, load_rgb
from numclip_cli.model.methods import OrdinalModel


class ImageFiles(Dataset):
    """Paths → preprocessed tensors; a file that cannot be used yields its one-line error instead."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(load_rgb(self.paths[index])), ""
        except ImageLoadError as exc:
            return index, None, str(exc)
        except Exception as exc:  # a transform failing on an odd image must not stop the run
            return index, None, f"cannot preprocess image: {' '.join(str(exc).split())[:200]}"


@dataclass
class Batch:
    """Decoded images of one batch and the errors of the inputs that failed."""

    indices: list[int]
    images: torch.Tensor | None  # stacked tensors of the inputs that decoded, in order
    errors: dict[int, str]


def collate(items: list[tuple[int, torch.Tensor | None, str]]) -> Batch:
    """Stack the decoded images, keep the errors by input index."""
    ok = [tensor for _, tensor, _ in items if tensor is not None]
    return Batch(indices=[i for i, _, _ in items], images=torch.stack(ok) if ok else None,
                 errors={i: err for i, tensor, err in items if tensor is None})


def batches(paths: Sequence[str], transform: Callable, batch_size: int, workers: int,
            pin_memory: bool = False) -> Iterator[Batch]:
    """Decoded batches in input order; workers decode ahead while the model computes."""
    loader = DataLoader(ImageFiles(paths, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=pin_memory, prefetch_factor=2 if workers else None,
                        persistent_workers=False)
    yield from loader


# Starting workers (0.1-0.3 s measured: each forks the process holding the model) costs more than decoding this
# many images in the main process, whatever the batch size.
FEW_INPUTS = 16


def default_workers(num_inputs: int, batch_size: int) -> int:
    """Decode in the main process for a handful of images (no start-up cost), else use up to 4 workers."""
    import os

    if num_inputs <= max(batch_size, FEW_INPUTS):
        return 0
    return max(1, min(4, (os.cpu_count() or 1)))


def image_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA (open_clip's own inference setting), a no-op elsewhere."""
    # callers wrap the image tower only: logits scaled by up to 100 need fp32 before the softmax
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


def quantize_image_tower(model: OrdinalModel) -> None:
    """``--fast`` on CPU: int8 dynamic quantisation of the image tower's ``nn.Linear`` layers, in place.

    Measured by ``numclip bench`` (README, Performance); bf16 autocast and ``torch.compile`` were measured too and
    not kept. The attention in-projection of ``nn.MultiheadAttention`` is not an ``nn.Linear`` and stays fp32.
    """
    import warnings

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not a dependency) but still works
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(model.clip.visual, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


class Predictor:
    """A model ready for inference: text features cached, optional calibration applied to probabilities."""

    def __init__(self, model: OrdinalModel, device: torch.device, temperature: float = 1.0,
                 conformal: ConformalRule | None = None, fast: bool = False) -> None:
        self.model = model.eval()
        self.device = device
        self.temperature = temperature
        self.conformal = conformal  # adds an interval and a contiguous bin set to every record
        self.task = model.task
        with torch.inference_mode():
            self.text_features = model.text_features()
        self.memory_format = torch.preserve_format
        if device.type == "cuda":
            # NHWC lets cuDNN pick its fastest kernels for the patch-embedding convolution
            self.memory_format = torch.channels_last
            self.model.to(memory_format=self.memory_format)
        elif fast:
            quantize_image_tower(self.model)

    @torch.inference_mode()
    def predict_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bin probabilities, fine value and readouts for a batch of preprocessed images."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        with image_autocast(self.device):
            features = self.model.encode_images(images)
        out = self.model.head(features, self.text_features)
        bin_logits = self.model.bin_logits(out.logits).float()
        probs = (bin_logits / self.temperature).softmax(dim=-1)
        result = {"value": out.value.float(), "probs": probs, "bin_logits": bin_logits,
                  "expected_bin": probs @ torch.arange(probs.shape[1], device=probs.device, dtype=probs.dtype)}
        if out.value_max is not None:
            result["value_max"] = out.value_max.float()
        if self.conformal is not None:
            result["interval_low"], result["interval_high"] = self.conformal.intervals(
                result["value"], self.task.low, self.task.high)
            result["set_low"], result["set_high"] = self.conformal.bin_sets(bin_logits)
        return {key: value.cpu() for key, value in result.items()}

    def outputs(self, paths: Sequence[str], transform: Callable, batch_size: int = 32,
                workers: int | None = None) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
        """Each decoded batch with ``predict_images`` of its readable images (empty when none decoded)."""
        workers = default_workers(len(paths), batch_size) if workers is None else workers
        pin = self.device.type == "cuda"
        for batch in batches(paths, transform, batch_size, workers, pin_memory=pin):
            yield batch, (self.predict_images(batch.images) if batch.images is not None else {})

    def records(self, paths: Sequence[str], transform: Callable, batch_size: int = 32,
                workers: int | None = None) -> Iterator[dict[str, Any]]:
        """One record per path, in order: ``status: ok`` with the prediction or ``status: error``."""
        for batch, preds in self.outputs(paths, transform, batch_size, workers):
            rows = {key: value.tolist() for key, value in preds.items()}
            ok_position = 0
            for index in batch.indices:
                if index in batch.errors:
                    yield {"path": paths[index], "status": "error", "error": batch.errors[index]}
                    continue
                yield self._record(paths[index], {key: value[ok_position] for key, value in rows.items()})
                ok_position += 1

    def _record(self, path: str, row: dict[str, Any]) -> dict[str, Any]:
        names = self.task.bin_names
        probs = row["probs"]
        best = max(range(len(probs)), key=probs.__getitem__)
        record = {"path": path, "status": "ok", "task": self.task.name, "value": round(row["value"], 4),
                  "bin": names[best], "bin_index": best,
                  "probs": {name: round(p, 6) for name, p in zip(names, probs, strict=True)},
                  "expected_bin": round(row["expected_bin"], 4)}
        if "value_max" in row:
            record["value_max"] = round(row["value_max"], 4)
        if self.conformal is not None:
            record["interval"] = [round(row["interval_low"], 4), round(row["interval_high"], 4)]
            record["bin_set"] = names[row["set_low"]:row["set_high"] + 1]
            record["coverage"] = self.conformal.coverage
        return record
