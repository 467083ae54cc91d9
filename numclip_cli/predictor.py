"""Batched, streaming inference: run the model under ``inference_mode`` on batches decoded by
``numclip_cli.decoding``, with text features computed once, and yield one record per input (per face with
``--faces all``), in input order."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from numclip_cli.calibration import ConformalRule
from numclip_cli.decoding import Batch, Crops, batches, default_workers
from numclip_cli.errors import NumclipError, UsageError, one_line
from numclip_cli.feature_cache import FeatureCache, image_features
from numclip_cli.model.methods import OrdinalModel
from numclip_cli.precision import full_precision, resolve_precision


def fast_image_tower(model: OrdinalModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """``--fast`` on the CPU: the image tower as an int8 ONNX Runtime session (numclip_cli.onnx_tower), which
    needs ``numclip[fast]``; measured in docs/performance.md."""
    from numclip_cli.onnx_tower import int8_image_tower

    size = model.clip.visual.preprocess_cfg["size"]
    return int8_image_tower(model.clip.visual, int(size[0] if isinstance(size, list | tuple) else size))


class Predictor:
    """A model ready for inference: text features cached, optional calibration applied to probabilities."""

    def __init__(self, model: OrdinalModel, device: torch.device, temperature: float = 1.0,
                 conformal: ConformalRule | None = None, fast: bool = False,
                 warn: Callable[[str], None] = lambda message: None, precision: str | None = None,
                 feature_cache: FeatureCache | None = None) -> None:
        self.model = model.eval()
        self.device = device
        self.precision = resolve_precision(precision, device)  # None: amp on CUDA, fp32 elsewhere
        self.precision.cast_backbone(self.model.clip)
        self.temperature = temperature
        self.conformal = conformal  # adds an interval and a contiguous bin set to every record
        self.warn = warn
        self.feature_cache = feature_cache  # image features read from and stored on disk (calibrate)
        self.max_batch: int | None = None  # set when a batch did not fit in device memory
        self.task = model.task
        with torch.inference_mode():
            self.text_features = model.text_features()
        self.memory_format = torch.preserve_format
        self.image_tower: Callable[[torch.Tensor], torch.Tensor] | None = None  # --fast: replaces clip.visual
        if device.type == "cuda":
            # NHWC lets cuDNN pick its fastest kernels for the patch-embedding convolution
            self.memory_format = torch.channels_last
            self.model.to(memory_format=self.memory_format)
        elif fast and device.type == "cpu":
            if self.precision.name != "fp32":
                raise UsageError(f"--fast runs the image tower in int8: it does not combine with --precision "
                                 f"{self.precision.name}")
            self.image_tower = fast_image_tower(self.model)

    @torch.inference_mode()
    def predict_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bin probabilities, fine value and readouts for a batch of preprocessed images."""
        return self.predict_features(self.encode_images(images))

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image-tower features (float32, on the device) of a batch of preprocessed images, in ``precision``."""
        if self.image_tower is not None:
            return self.image_tower(images).float()
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        with self.precision.autocast():
            return self.model.encode_images(images).float()

    @torch.inference_mode()
    def predict_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``predict_images`` from image-tower features (the head only)."""
        # the head in float32 whatever --precision (numclip_cli.precision says why)
        with full_precision(self.device.type):
            out = self.model.head(features.to(self.device).float(), self.text_features)
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

    def outputs(self, paths: Sequence[str], transform: Callable, batch_size: int = 32, workers: int | None = None,
                crops: Crops | None = None) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
        """Each decoded batch with ``predict_images`` of its readable images (empty when none decoded)."""
        workers = default_workers(len(paths), batch_size, self.device.type) if workers is None else workers
        if self.feature_cache is not None and crops is None:
            yield from self._cached_outputs(paths, transform, batch_size, workers)
            return
        pin = self.device.type == "cuda"
        for batch in batches(paths, transform, batch_size, workers, pin_memory=pin, crops=crops):
            yield batch, (self.predict_fitting(batch.images) if batch.images is not None else {})

    def _cached_outputs(self, paths: Sequence[str], transform: Callable, batch_size: int,
                        workers: int) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
        """``outputs`` from the image features ``feature_cache`` holds; the others are encoded first (and stored)."""
        found, errors = image_features(paths, transform, self.encode_images, self.feature_cache, batch_size, workers)
        for start in range(0, len(paths), batch_size):
            indices = list(range(start, min(start + batch_size, len(paths))))
            ok = [i for i in indices if i in found]
            batch = Batch(indices, None, {i: errors[i] for i in indices if i not in found},
                          {i: [{}] for i in ok})
            yield batch, (self.predict_features(torch.stack([found[i] for i in ok])) if ok else {})

    def predict_fitting(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``predict_images`` in slices that fit in device memory: out of memory halves the slice, with a warning."""
        parts, start = [], 0
        while start < len(images):
            size = min(self.max_batch or len(images), len(images) - start)
            part = self._predict_unless_out_of_memory(images[start:start + size])
            if part is None:
                # here, not in the except block: the failed attempt's tensors are freed before the cache is emptied
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.max_batch = size // 2
                self.warn(f"out of {self.device} memory with {size} images per batch: continuing with "
                          f"{self.max_batch} (--batch-size {self.max_batch} avoids the retry)")
                continue
            parts.append(part)
            start += size
        return parts[0] if len(parts) == 1 else {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def _predict_unless_out_of_memory(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``predict_images``, or None when the batch does not fit (one image that does not fit is an error)."""
        try:
            return self.predict_images(images)
        except torch.OutOfMemoryError as exc:
            if len(images) == 1:
                raise NumclipError(f"out of {self.device} memory even for one image: {one_line(exc)}"
                                   f" (try a smaller --model or --device cpu)") from None
            return None

    def records(self, paths: Sequence[str], transform: Callable, batch_size: int = 32, workers: int | None = None,
                crops: Crops | None = None) -> Iterator[dict[str, Any]]:
        """One record per path (per view with ``crops``), in order: ``status: ok`` with the prediction, or ``error``."""
        for group in self.input_records(paths, transform, batch_size, workers, crops):
            yield from group

    def input_records(self, paths: Sequence[str], transform: Callable, batch_size: int = 32,
                      workers: int | None = None, crops: Crops | None = None) -> Iterator[list[dict[str, Any]]]:
        """The records of each path, in order: one, or one per face with ``--faces all``."""
        for batch, preds in self.outputs(paths, transform, batch_size, workers, crops):
            rows = {key: value.tolist() for key, value in preds.items()}
            ok_position = 0
            for index in batch.indices:
                if index in batch.errors:
                    yield [{"path": paths[index], "status": "error", "error": batch.errors[index]}]
                    continue
                group = []
                for fields in batch.fields[index]:
                    row = {key: value[ok_position] for key, value in rows.items()}
                    group.append({**self._record(paths[index], row), **fields})
                    ok_position += 1
                yield group

    def _record(self, path: str, row: dict[str, Any]) -> dict[str, Any]:
        """The record of one view: ``value`` (the fine estimate, always inside the task range), ``bin`` (the most
        probable bin) and ``value_bin`` (the bin that contains ``value``). They differ only when the
        probabilities are spread: the fine value weighs every bin, so 0.55 on "teenager" and 0.45 on "middle
        adult" gives about 31 years, a "young adult". Non-finite outputs become an error record."""
        if not all(math.isfinite(number) for number in _numbers(row.get(key, 0.0) for key in _RECORDED)):
            return {"path": path, "status": "error", "error": NON_FINITE}
        names = self.task.bin_names
        probs = row["probs"]
        best = max(range(len(probs)), key=probs.__getitem__)
        value = self.task.clamp(row["value"])  # already inside by construction; float rounding may not be
        record = {"path": path, "status": "ok", "task": self.task.name, "value": round(value, 4),
                  "bin": names[best], "bin_index": best, "value_bin": names[self.task.bin_index(value)],
                  "probs": {name: round(p, 6) for name, p in zip(names, probs, strict=True)},
                  "expected_bin": round(row["expected_bin"], 4)}
        if "value_max" in row:
            record["value_max"] = round(row["value_max"], 4)
        if self.conformal is not None:
            record["interval"] = [round(row["interval_low"], 4), round(row["interval_high"], 4)]
            record["bin_set"] = names[row["set_low"]:row["set_high"] + 1]
            record["coverage"] = self.conformal.coverage
        return record


NON_FINITE = "model produced a non-finite value (NaN/inf)"
# outputs that reach a record (bin logits may be −inf legitimately: a bin holding no rank has probability 0)
_RECORDED = ("value", "value_max", "probs", "expected_bin", "interval_low", "interval_high")


def _numbers(values: Iterable[Any]) -> Iterator[float]:
    """Every number in a row of per-image outputs (scalars and lists of them)."""
    for value in values:
        if isinstance(value, list):
            yield from value
        else:
            yield value
