"""The speed suite: predict's speed against the raw open_clip backbone, measured in one process and one run.

The speed suite has the shape of nanoGPT's ``bench.py`` (a warm-up call, ``torch.cuda.synchronize()`` on GPU, the
median of repeats), and the repeats of the runs it compares are interleaved so that a change in the machine's load
hits them alike. On the same generated images, backbone, device and batch size it measures
(a) raw open_clip: PIL decode + open_clip preprocess + ``encode_image``, the physical limit;
(b) ``numclip predict`` end to end through ``Predictor.records`` (DataLoader decoding, cached text features);
(c) the reference implementations' inference, which run the text tower again on every batch: K bin prompts
(NumCLIP) and M rank prompts (OrdinalCLIP over the age task's integer ranks);
(d) decoding alone; (e) cold start and ``numclip --help`` as subprocesses; (f) peak memory; (g) predict with
``--faces largest`` and face detection alone, when ``numclip[face]`` is installed; and optionally
``--fast`` (with its agreement with fp32) and the RSS growth of a long streamed run.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from numclip_cli.backbone import DEFAULT_MODEL, NO_WEIGHTS
from numclip_cli.bench.report import Figure, SpeedResult
from numclip_cli.bench.system import current_rss_mb, peak_rss_mb, run_process
from numclip_cli.coldstart import cold_start_phases
from numclip_cli.errors import NumclipError
from numclip_cli.factory import LoadedModel, create_model_and_transforms
from numclip_cli.images import load_rgb
from numclip_cli.model.methods import OrdinalModel, create_model
from numclip_cli.onnx_tower import fast_available
from numclip_cli.precision import resolve_precision
from numclip_cli.predictor import Predictor
from numclip_cli.synthetic import get_generator, render
from numclip_cli.tasks import TaskSpec, get_task, task_from_dict
from numclip_cli.writers import make_writer

BENCH_TASK = "age"  # K = 5 bins; its integer ranks 0–100 are the M = 101 rank prompts
DEFAULT_RANKS = 101
IMAGE_KIND = "dots"
QUICK = {"images": 16, "latency_images": 2, "repeats": 1, "cold_repeats": 1}
_HELP_REPEATS = 3

Progress = Callable[[str], None]
Timed = tuple[Callable[[Sequence[str]], Any], Sequence[str], Sequence[str] | None]  # run, its paths, warm-up paths


@dataclass
class SpeedConfig:
    """What the speed suite measures and how much work each measurement does."""

    model: str = DEFAULT_MODEL  # open_clip architecture (ignored with ``checkpoint``)
    pretrained: str = NO_WEIGHTS  # weights do not change speed; ``none`` needs no download
    checkpoint: str | None = None  # bench a trained model instead (its task gives K)
    batch_size: int = 32
    images: int = 64  # images per throughput measurement
    latency_images: int = 8  # images per batch-1 measurement (a quarter of them for the M-rank reference)
    ranks: int = DEFAULT_RANKS  # M, the rank prompts the OrdinalCLIP-style reference recomputes
    repeats: int = 3  # timed runs per figure; the median is reported
    cold_repeats: int = 3  # cold-start subprocesses; the median is reported
    fast: bool = True  # also measure ``predict --fast`` on CPU and its same-bin agreement with fp32
    stream: int = 0  # images streamed through predict to measure RSS growth (0: skip)
    precision: str | None = None  # --precision of predict and of the raw open_clip run (None: the device's default)

    @classmethod
    def create(cls, quick: bool = False, **given: Any) -> SpeedConfig:
        """Defaults for a full or a ``--quick`` run; every option given (not None) wins."""
        base = cls(**QUICK) if quick else cls()
        return replace(base, **{key: value for key, value in given.items() if value is not None})


class ReferencePredictor(Predictor):
    """The reference implementations' inference: the text tower runs again for every batch."""

    def predict_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Recompute the text features, then predict as usual."""
        with torch.inference_mode():
            self.text_features = self.model.text_features()
        return super().predict_images(images)


def rank_task(ranks: int) -> TaskSpec:
    """The age prompt over integer ranks 0…ranks−1 (101: exactly the built-in age task's rank prompts)."""
    if ranks < 2:
        raise NumclipError(f"--ranks must be at least 2, got {ranks}")
    age, half = get_task(BENCH_TASK), ranks // 2
    return task_from_dict({"name": f"{BENCH_TASK}-{ranks}-ranks", "unit": age.unit, "prompt": age.prompt,
                           "bins": [{"name": "younger", "low": 0, "high": half - 1},
                                    {"name": "older", "low": half, "high": ranks - 1}]})


def write_images(folder: Path, count: int, side: int) -> list[str]:
    """``count`` synthetic JPEGs (``side`` px, labels cycling over the range), as a camera folder holds them."""
    labels = get_generator(IMAGE_KIND).labels
    paths = []
    for index in range(count):
        path = folder / f"bench_{index:05d}.jpg"
        render(IMAGE_KIND, labels[index % len(labels)], seed=index, size=side).save(path, quality=90)
        paths.append(str(path))
    return paths


def run_speed_suite(config: SpeedConfig, device: torch.device, on_progress: Progress | None = None) -> SpeedResult:
    """Every speed figure, measured in this process on freshly generated images."""
    say = on_progress or (lambda message: None)
    if config.checkpoint:
        session = create_model_and_transforms(device, checkpoint=config.checkpoint)
    else:
        session = create_model_and_transforms(device, model=config.model, pretrained=config.pretrained,
                                              task=BENCH_TASK, method="numclip")
    with tempfile.TemporaryDirectory(prefix="numclip-bench-") as folder:
        side = session.backbone.image_size * 5 // 4  # larger than the input, so preprocess really resizes
        say(f"writing {config.images} {side}-px JPEG images")
        paths = write_images(Path(folder), max(config.images, config.latency_images), side)
        run = _SpeedRun(config, device, session, say)
        run.throughput(paths[: config.images])
        run.faces(paths[: config.images])
        run.batch_one(paths[: config.latency_images])
        if config.stream:
            run.stream(paths, Path(folder))
        run.feature_cache(paths[: config.images], Path(folder))
        run.cold_start(paths[0])
        run.memory()
        run.train_step(paths[: config.batch_size])  # last: it makes the shared image tower trainable
    backbone = session.backbone
    trained = bool(config.checkpoint) or not backbone.random_init
    return SpeedResult({"backbone": backbone.name, "pretrained": backbone.pretrained, "trained": trained,
                        "image_size": backbone.image_size, "method": session.model.method, "task": session.task.name,
                        "bins": len(session.task.bins)}, run.figures)


class _SpeedRun:
    """The measurements of one speed-suite run, in order, sharing one model and one set of images."""

    def __init__(self, config: SpeedConfig, device: torch.device, session: LoadedModel, say: Progress) -> None:
        self.config, self.device, self.session, self.say = config, device, session, say
        self.preprocess = session.transform
        self.figures: list[Figure] = []
        self.raw_rate = 0.0  # (a), the reference of every speed ratio

    def add(self, key: str, label: str, value: float, unit: str, batch_size: int | None = None,
            images: int | None = None) -> float:
        """Record one figure and return its value (``report.judge`` adds the targets that apply)."""
        self.figures.append(Figure(key, label, round(value, 4), unit, batch_size, images))
        return value

    def timed(self, run: Callable[[Sequence[str]], Any], paths: Sequence[str],
              warm: Sequence[str] | None) -> tuple[float, Any]:
        """Median seconds of ``run(paths)`` over the repeats after a warm-up ``run(warm)``, and its last result."""
        return self.interleaved({"run": (run, paths, warm)})["run"]

    def interleaved(self, runs: dict[str, Timed]) -> dict[str, tuple[float, Any]]:
        """``timed`` for several runs, interleaved: each repeat runs them all in turn, so load changes hit all alike."""
        for run, _, warm in runs.values():
            if warm is not None:
                run(warm)
        times: dict[str, list[float]] = {name: [] for name in runs}
        results: dict[str, Any] = {}
        for _ in range(self.config.repeats):
            for name, (run, paths, _) in runs.items():
                self._sync()
                start = time.perf_counter()
                results[name] = run(paths)
                self._sync()
                times[name].append(time.perf_counter() - start)
        return {name: (statistics.median(times[name]), results[name]) for name in runs}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def predictor(self, model: OrdinalModel, kind: type[Predictor] = Predictor, **options: Any) -> Predictor:
        """A predictor of ``kind`` on the bench's device, in the bench's ``--precision``."""
        return kind(model, self.device, precision=self.config.precision, **options)

    def predict_run(self, predictor: Predictor, batch_size: int) -> Callable[[Sequence[str]], list[int]]:
        """``numclip predict``'s own path: every record built, the bin indices kept."""
        return lambda paths: [r["bin_index"] for r in predictor.records(paths, self.preprocess, batch_size)]

    def throughput(self, paths: Sequence[str]) -> None:
        """(a) raw open_clip, (b) predict, ``predict --fast`` (CPU) and (d) decoding, on the same images."""
        batch, n, warm = self.config.batch_size, len(paths), paths[: self.config.batch_size]
        runs: dict[str, Timed] = {
            "raw": (self._raw_open_clip, paths, warm),
            "predict": (self.predict_run(self.predictor(self.session.model), batch), paths, warm),
            "decode": (self._decode, paths, warm[:1]),
        }
        fast = self.config.fast and self.device.type == "cpu"
        if fast and not fast_available():
            self.say("predict --fast: numclip[fast] (onnxruntime, onnx) is not installed, skipped")
            fast = False
        if fast:  # the int8 ONNX Runtime tower stands beside the model's own: no copy needed
            fast_predictor = self.predictor(self.session.model, fast=True)
            runs["fast"] = (self.predict_run(fast_predictor, batch), paths, warm)
        self.say(f"raw open_clip vs numclip predict{' vs --fast' if fast else ''} vs decoding alone "
                 f"({n} images, batch {batch}, x{self.config.repeats} interleaved)")
        times = self.interleaved(runs)
        self.add("decode", "decode + preprocess (load_rgb, 1 process)", n / times["decode"][0], "images/s", None, n)
        self.raw_rate = self.add("raw_open_clip", "(a) raw open_clip: PIL + preprocess + encode_image",
                                 n / times["raw"][0], "images/s", batch, n)
        rate = self.add("predict", "(b) numclip predict, end to end", n / times["predict"][0], "images/s", batch, n)
        self.add("ratio_predict_raw", "(b)/(a) predict vs raw open_clip", rate / self.raw_rate, "x", batch, n)
        if fast:
            rate = self.add("predict_fast", "predict --fast (int8 ONNX Runtime image tower)", n / times["fast"][0],
                            "images/s", batch, n)
            self.add("ratio_fast_raw", "--fast vs (a) raw open_clip", rate / self.raw_rate, "x", batch, n)
            agree = sum(a == b for a, b in zip(times["fast"][1], times["predict"][1], strict=True)) / n
            self.add("fast_agreement", "--fast same-bin agreement with fp32 predict", 100 * agree, "%", batch, n)

    def _decode(self, paths: Sequence[str]) -> None:
        for path in paths:
            self.preprocess(load_rgb(path))

    def _raw_open_clip(self, paths: Sequence[str]) -> None:
        """What a plain open_clip script does (open_clip's README: no_grad, autocast), in predict's precision."""
        clip, batch = self.session.backbone.model, self.config.batch_size
        precision = resolve_precision(self.config.precision, self.device)
        with torch.no_grad(), precision.autocast():
            for start in range(0, len(paths), batch):
                images = [self.preprocess(_pil_rgb(path)) for path in paths[start : start + batch]]
                clip.encode_image(torch.stack(images).to(self.device))

    def batch_one(self, paths: Sequence[str]) -> None:
        """(c) cached vs recomputed text features at batch 1: K bin prompts, then M rank prompts (OrdinalCLIP)."""
        self.cached_vs_recomputed("k", self.session.model, "bin", paths)
        ranks_model = create_model("ordinalclip", self.session.backbone, rank_task(self.config.ranks)).eval()
        self.cached_vs_recomputed("m", ranks_model, "rank", paths[: max(1, len(paths) // 4)])

    def cached_vs_recomputed(self, key: str, model: OrdinalModel, kind: str, paths: Sequence[str]) -> None:
        """The text tower alone, then predict at batch 1 with cached and with per-batch text features."""
        with torch.inference_mode():
            what = f"{model.text_features().shape[0]} {kind} prompts"  # also the warm-up of the text tower
        self.say(f"batch 1: cached vs recomputed text features, {what}")
        seconds, _ = self.timed(lambda _: self._text_features(model), [], None)
        self.add(f"text_tower_{key}", f"text tower alone, {what}", 1000 * seconds, "ms")
        n = len(paths)
        times = self.interleaved({
            "cached": (self.predict_run(self.predictor(model), 1), paths, paths[:1]),
            "fresh": (self.predict_run(self.predictor(model, ReferencePredictor), 1), paths, paths[:1])})
        cached, fresh = times["cached"][0], times["fresh"][0]
        self.add(f"predict_b1_{key}", f"(b) predict, cached text features, {what}", 1000 * cached / n, "ms/image",
                 1, n)
        self.add(f"reference_b1_{key}", f"(c) reference: text features recomputed per batch, {what}",
                 1000 * fresh / n, "ms/image", 1, n)
        self.add(f"ratio_reference_{key}", f"(b)/(c) speed-up over the reference, {what}", fresh / cached, "x", 1, n)

    @staticmethod
    @torch.inference_mode()
    def _text_features(model: OrdinalModel) -> torch.Tensor:
        return model.text_features()

    def faces(self, paths: Sequence[str]) -> None:
        """(g) predict with and without ``--faces largest``, and face detection alone on a photo-sized image."""
        from numclip_cli.faces import DETECT_MAX_SIDE, FaceCrops, detect, face_detection_available

        if not face_detection_available():
            self.say("face detection: numclip[face] is not installed, skipped")
            return
        batch, n, crops = self.config.batch_size, len(paths), FaceCrops("largest")
        self.say(f"numclip predict --faces largest (batch {batch})")
        predictor = self.predictor(self.session.model)
        seconds, _ = self.timed(lambda p: list(predictor.records(p, self.preprocess, batch, crops=crops)), paths,
                                paths[:batch])
        self.add("predict_faces", "(b) numclip predict --faces largest (detect + crop, then predict)", n / seconds,
                 "images/s", batch, n)
        # random texture: it costs the cascade about what a photo does, a flat synthetic image far less
        texture = Image.effect_noise((DETECT_MAX_SIDE, DETECT_MAX_SIDE), 64).convert("RGB")
        seconds, _ = self.timed(lambda _: detect(texture), [], [])
        self.add("face_detect", f"face detection alone, {DETECT_MAX_SIDE}-px image (larger photos are scaled to it)",
                 1000 * seconds, "ms/image", 1, 1)

    def stream(self, pool: Sequence[str], folder: Path) -> None:
        """RSS growth while ``config.stream`` inputs (hard links to the bench images) stream through predict."""
        count, batch = self.config.stream, self.config.batch_size
        self.say(f"streaming {count} images through predict")
        links = folder / "stream"
        links.mkdir()
        paths = []
        for index in range(count):
            path = links / f"s_{index:06d}.jpg"
            os.link(pool[index % len(pool)], path)
            paths.append(str(path))
        task = self.session.task
        samples = []
        start = time.perf_counter()
        with open(os.devnull, "w", encoding="utf-8") as sink:
            writer = make_writer("jsonl", sink, task.bin_names)
            for done, record in enumerate(self.predictor(self.session.model).records(
                    paths, self.preprocess, batch), start=1):
                writer.write(record)
                if done % batch == 0:
                    samples.append(current_rss_mb())
        seconds = time.perf_counter() - start
        # the baseline is taken once the first 5 % are through (allocator pools and worker pipes settled)
        settled = samples[len(samples) // 20 :] or [current_rss_mb()]
        self.add("stream_rate", "streamed predict", count / seconds, "images/s", batch, count)
        self.add("stream_rss_growth", "RSS growth while streaming (after the first 5 %)", max(settled) - settled[0],
                 "MB", batch, count)

    def cold_start(self, image: str) -> None:
        """(e) ``numclip predict`` on one image and ``numclip --help``, each a fresh process."""
        command = _numclip_command()
        if self.config.checkpoint:
            model_args = ["--checkpoint", self.config.checkpoint]
        else:
            model_args = ["--model", self.config.model, "--pretrained", self.config.pretrained, "--task", BENCH_TASK]
        predict = [*command, "predict", image, "--format", "jsonl", "--batch-size", "1", "--device",
                   str(self.device), "--quiet", "--offline", *model_args]
        self.say(f"cold start: numclip predict one image (x{self.config.cold_repeats})")
        runs = [run_process(predict) for _ in range(self.config.cold_repeats)]
        self.add("cold_start", "cold start: process start to first predict result", statistics.median(
            first for first, _, _ in runs), "s", 1, 1)
        peak = max(rss for _, _, rss in runs)
        if peak:
            self.add("cold_start_peak_rss", "peak RSS of that predict process", peak, "MB", 1, 1)
        if self.config.checkpoint:  # where that time goes: imports, model build, first batch, interpreter
            for phase, seconds in cold_start_phases(self.config.checkpoint, image, str(self.device)).items():
                self.add(f"cold_start_{phase}", f"cold start phase: {phase.replace('_', ' ')}", seconds, "s", 1, 1)
        self.say("numclip --help")
        help_seconds = statistics.median(run_process([*command, "--help"])[1] for _ in range(_HELP_REPEATS))
        self.add("help", "numclip --help, start to exit", help_seconds, "s")

    def feature_cache(self, paths: Sequence[str], folder: Path) -> None:
        """(i) what a second ``train --freeze-image`` / linear-probe / ``calibrate`` run on the same images saves:
        image features encoded and stored (first run) vs read back from the feature cache (second run)."""
        from numclip_cli.feature_cache import FeatureCache, image_features

        predictor = self.predictor(self.session.model)
        preprocess = self.session.preprocess
        batch, n = self.config.batch_size, len(paths)
        first = second = 0.0
        for repeat in range(self.config.repeats):  # a fresh cache folder each time: the first run really encodes
            cache = FeatureCache.for_model(folder / f"cache{repeat}", self.session.model, preprocess.image,
                                           preprocess.faces, preprocess.face_margin, predictor.precision.name)
            for which in ("first", "second"):
                self._sync()
                start = time.perf_counter()
                image_features(paths, self.preprocess, predictor.encode_images, cache, batch, workers=0)
                self._sync()
                seconds = time.perf_counter() - start
                first, second = (first + seconds, second) if which == "first" else (first, second + seconds)
        self.say(f"feature cache: first vs second run over {n} images (x{self.config.repeats})")
        self.add("cache_first_run", "feature cache, first run (encode + store)", n * self.config.repeats / first,
                 "images/s", batch, n)
        self.add("cache_second_run", "feature cache, second run (read back)", n * self.config.repeats / second,
                 "images/s", batch, n)
        self.add("ratio_cache_second_first", "feature cache: second run vs first", first / second, "x", batch, n)

    def train_step(self, paths: Sequence[str]) -> None:
        """(h) one numclip training step (image tower tuned, RAdam, as ``train``) against a raw open_clip
        ``encode_image`` forward + backward + RAdam step on the same preprocessed batch."""
        from numclip_cli.trainer import TrainConfig, Trainer

        task, n = self.session.task, len(paths)
        images = torch.stack([self.preprocess(_pil_rgb(path)) for path in paths]).to(self.device)
        values = torch.tensor([task.bins[i % len(task.bins)].representative for i in range(n)], device=self.device)
        batch = {"images": images, "values": values,
                 "bins": torch.tensor([i % len(task.bins) for i in range(n)], device=self.device)}
        trainer = Trainer(self.session.backbone, task, TrainConfig(method="numclip", epochs=1, batch_size=n,
                                                                   precision=self.config.precision), self.device)
        trainer.model.train()
        clip = self.session.backbone.model
        raw_optimizer = torch.optim.RAdam(clip.visual.parameters())

        def numclip_step(_: Any) -> None:
            loss = trainer.step(batch)["total"]
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.scaler.scale(loss).backward()
            trainer.scaler.step(trainer.optimizer)
            trainer.scaler.update()

        def raw_step(_: Any) -> None:
            with trainer.precision.autocast():
                features = clip.encode_image(images)
            raw_optimizer.zero_grad(set_to_none=True)
            features.float().pow(2).mean().backward()
            raw_optimizer.step()

        self.say(f"training step: numclip vs raw open_clip forward + backward (batch {n}, x{self.config.repeats})")
        times = self.interleaved({"raw": (raw_step, (), ()), "numclip": (numclip_step, (), ())})  # () : one warm-up
        raw = self.add("train_step_raw", "raw open_clip forward + backward + RAdam step", times["raw"][0], "s", n, n)
        step = self.add("train_step", "numclip training step (image tower tuned)", times["numclip"][0], "s", n, n)
        self.add("ratio_train_step_raw", "numclip training step vs raw open_clip step", step / raw, "x", n, n)

    def memory(self) -> None:
        """(f) peak RSS of this bench process and, on CUDA, peak CUDA memory."""
        self.add("peak_rss", "peak RSS of the bench process", peak_rss_mb(), "MB")
        if self.device.type == "cuda":
            self.add("peak_cuda", "peak CUDA memory allocated", torch.cuda.max_memory_allocated(self.device) / 2**20,
                     "MB")


def _pil_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _numclip_command() -> list[str]:
    """The installed ``numclip`` script next to this interpreter, else ``python -m numclip_cli``."""
    script = Path(sys.executable).with_name("numclip")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "numclip_cli"]
