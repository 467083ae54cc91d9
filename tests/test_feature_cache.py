"""The on-disk feature cache of frozen image towers: a second run reads instead of encoding, damaged entries are
rebuilt, and anything that changes the features (weights, preprocessing, faces, precision) selects other entries."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from numclip_cli import feature_cache
from numclip_cli.backbone import load_backbone
from numclip_cli.datasets import load_samples
from numclip_cli.feature_cache import FeatureCache, default_cache_dir, file_digest
from numclip_cli.synthetic import task_spec, write_dataset
from numclip_cli.trainer import TrainConfig, Trainer

CPU = torch.device("cpu")
N = 24


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dots")
    write_dataset("dots", root, n=N, seed=0)
    return load_samples(root, task_spec("dots"))


def frozen_trainer(cache: Path | None, method: str = "linear-probe", lr: float = 1e-2,
                   backbone=None) -> tuple[Trainer, list[int]]:
    """A trainer whose image tower is frozen, and the running count of images its image tower encoded."""
    torch.manual_seed(0)
    config = TrainConfig(method=method, epochs=1, batch_size=8, lr=lr, tune_image=False, workers=0)
    trainer = Trainer(backbone or load_backbone("numclip-tiny", "none"), task_spec("dots"), config, CPU,
                      cache_dir=cache)
    encoded = [0]
    encode = trainer.model.encode_images

    def counting(images: torch.Tensor) -> torch.Tensor:
        encoded[0] += len(images)
        return encode(images)

    trainer.model.encode_images = counting
    return trainer, encoded


def entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"))


def test_a_second_run_with_another_method_and_lr_reads_the_cache(samples, tmp_path: Path) -> None:
    first, encoded = frozen_trainer(tmp_path)
    features = first._features(samples)["features"]
    assert encoded[0] == N and first.disk_cache.stored == N and len(entries(tmp_path)) == N
    second, encoded = frozen_trainer(tmp_path, method="numclip", lr=3e-3)  # --freeze-image
    second.fit(samples, samples, tmp_path / "m.safetensors")
    assert encoded[0] == 0, "the image tower ran although every feature was cached"
    assert second.disk_cache.hits == N
    torch.testing.assert_close(second._features(samples)["features"], features)


def test_without_a_cache_dir_every_run_encodes(samples, tmp_path: Path) -> None:
    frozen_trainer(None)[0]._features(samples)
    trainer, encoded = frozen_trainer(None)
    trainer._features(samples)
    assert encoded[0] == N and trainer.disk_cache is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_shape", "not_finite", "other_key"])
def test_a_damaged_entry_is_ignored_and_rebuilt(damage: str, samples, tmp_path: Path) -> None:
    first, _ = frozen_trainer(tmp_path)
    reference = first._features(samples)["features"]
    victim = entries(tmp_path)[3]
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:40])
    elif damage == "garbage":
        victim.write_bytes(b"\x00" * 300)
    else:
        meta = {"numclip.features": "1", "key": first.disk_cache.key, "file": victim.stem}
        tensor = torch.zeros(first.model.embed_dim)
        if damage == "wrong_shape":
            tensor = torch.zeros(3, 2)
        elif damage == "not_finite":
            tensor[0] = float("nan")
        else:
            meta["key"] = "0" * 64
        save_file({"features": tensor}, str(victim), metadata=meta)
    second, encoded = frozen_trainer(tmp_path)
    features = second._features(samples)["features"]
    assert encoded[0] == 1 and second.disk_cache.rejected == 1 and second.disk_cache.hits == N - 1
    torch.testing.assert_close(features, reference)  # the rebuilt entry holds the true features
    third, encoded = frozen_trainer(tmp_path)
    third._features(samples)
    assert encoded[0] == 0 and third.disk_cache.rejected == 0


def test_other_backbone_weights_do_not_use_the_entries(samples, tmp_path: Path) -> None:
    frozen_trainer(tmp_path)[0]._features(samples)
    other = load_backbone("numclip-tiny", "none")
    with torch.no_grad():
        other.model.visual.proj.mul_(1.01)  # one tensor of the image tower changed
    trainer, encoded = frozen_trainer(tmp_path, backbone=other)
    trainer._features(samples)
    assert encoded[0] == N and trainer.disk_cache.hits == 0


def test_preprocessing_faces_and_precision_are_part_of_the_key() -> None:
    tower = torch.nn.Linear(2, 2)
    base = {"preprocess": {"size": 64}, "faces": "none", "face_margin": None, "precision": "fp32"}
    key = FeatureCache.open("c", tower, 2, base).key
    for change in ({"preprocess": {"size": 96}}, {"faces": "largest", "face_margin": 0.4}, {"precision": "amp_bf16"}):
        assert FeatureCache.open("c", tower, 2, {**base, **change}).key != key, change
    assert FeatureCache.open("c", tower, 2, dict(base)).key == key


def test_an_unwritable_cache_dir_does_not_stop_training(samples, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    trainer, encoded = frozen_trainer(blocker / "cache")
    trainer.fit(samples, samples, tmp_path / "m.safetensors")
    assert encoded[0] == N and not trainer.disk_cache.writable and trainer.disk_cache.stored == 0


def test_the_default_cache_dir_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "numclip" / "features"


def test_cli_train_uses_the_cache_and_no_cache_skips_it(run_cli, samples, tmp_path: Path) -> None:
    data = Path(samples.paths[0]).parents[1]
    common = ["train", "--data", data, "--task", data / "task.toml", "--model", "numclip-tiny", "--pretrained",
              "none", "--offline", "--device", "cpu", "--method", "linear-probe", "--epochs", "1", "--workers", "0",
              "--out", tmp_path / "m.safetensors"]
    assert run_cli([*common, "--no-cache", "--cache-dir", tmp_path / "unused"]).exit_code == 0
    assert not (tmp_path / "unused").exists()
    first = run_cli([*common, "--cache-dir", tmp_path / "c"])
    assert first.exit_code == 0 and f"0 image(s) read, {N} encoded" in first.stderr, first.stderr
    second = run_cli([*common, "--cache-dir", tmp_path / "c", "--lr", "0.1"])
    assert second.exit_code == 0 and f"{N} image(s) read, 0 encoded" in second.stderr, second.stderr


def test_cli_calibrate_reads_the_cache_on_a_second_run(run_cli, samples, tmp_path: Path) -> None:
    import json

    shipped = Path(__file__).resolve().parents[1] / "weights" / "numclip-tiny-dots.safetensors"
    data = Path(samples.paths[0]).parents[1]
    reports = []
    for run in range(2):
        report = tmp_path / f"report{run}.json"
        result = run_cli(["calibrate", "--checkpoint", shipped, "--data", data, "--out", tmp_path / "c.safetensors",
                          "--device", "cpu", "--workers", "0", "--cache-dir", tmp_path / "c", "--json", report])
        assert result.exit_code == 0, result.stderr
        read, encoded = (N, 0) if run else (0, N)
        assert f"{read} image(s) read, {encoded} encoded" in result.stderr, result.stderr
        reports.append(json.loads(report.read_text()))
    assert reports[0]["temperature"] == reports[1]["temperature"]
    assert reports[0]["metrics"] == reports[1]["metrics"]


def _digest_within(path: Path, seconds: float = 10.0) -> str | None:
    """file_digest(path), failing the test instead of hanging if it blocks (a daemon thread is left behind)."""
    result: list[str | None] = []
    worker = threading.Thread(target=lambda: result.append(file_digest(str(path))), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"file_digest({path}) did not return within {seconds} s"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_fifo_a_device_or_an_oversized_file_is_not_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache hashes a file before the image loader checks it: a FIFO among the images (or a link to one)
    must not block, a device must not stream forever, and a huge (here: sparse) file is not read at all."""
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "pipe.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    monkeypatch.setattr(feature_cache, "MAX_CACHED_FILE_BYTES", 1 << 20)
    with open(tmp_path / "sparse.png", "wb") as sparse:
        sparse.truncate((1 << 20) + 1)
    for name in ("pipe.png", "link.png", "zero.png", "sparse.png", "missing.png"):
        assert _digest_within(tmp_path / name) is None, name
    (tmp_path / "small.png").write_bytes(b"x" * 5000)
    assert _digest_within(tmp_path / "small.png") == hashlib.sha256(b"x" * 5000).hexdigest()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_cli_train_on_frozen_features_skips_a_fifo_in_the_dataset(numclip_bin: Path, clean_env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """In a real process with a time limit: before the fix this run blocked forever on the FIFO."""
    data = tmp_path / "dots"
    write_dataset("dots", data, n=12, seed=3)
    os.mkfifo(next(folder for folder in sorted(data.iterdir()) if folder.is_dir()) / "zz.png")
    done = subprocess.run(
        [numclip_bin, "train", "--data", data, "--model", "numclip-tiny", "--pretrained", "none", "--offline",
         "--device", "cpu", "--method", "linear-probe", "--epochs", "1", "--workers", "0", "--freeze-image",
         "--val-split", "0.25", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "m.safetensors"],
        env=clean_env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "unreadable image(s) skipped" in done.stderr
