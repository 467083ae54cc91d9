"""The one model factory: a checkpoint's stored preprocessing (open_clip settings + face crop) is what predict,
calibrate and bench get back; older checkpoints without it keep their old behaviour; training records it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from numclip_cli.checkpoint import Checkpoint, model_tensors, read_checkpoint, write_checkpoint
from numclip_cli.errors import CheckpointError, UsageError
from numclip_cli.faces import DEFAULT_MARGIN
from numclip_cli.factory import create_model_and_transforms, open_backbone
from numclip_cli.model.methods import create_model
from numclip_cli.preprocessing import Preprocessing
from numclip_cli.tasks import get_task

CUSTOM = {"size": [64, 64], "mode": "RGB", "mean": [0.5, 0.25, 0.75], "std": [0.1, 0.2, 0.3],
          "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0}


def write(path: Path, backbone, preprocess: dict | None, train: dict | None = None, task: str = "age") -> Path:
    model = create_model("numclip", backbone, get_task(task))
    write_checkpoint(path, Checkpoint(tensors=model_tensors(model, backbone, tuned_image=False), task=model.task,
                                      method="numclip", backbone=backbone.describe(), train=train or {},
                                      preprocess=preprocess))
    return path


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    generator = torch.Generator().manual_seed(3)
    pixels = (torch.rand(90, 130, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def test_the_stored_preprocessing_is_what_the_factory_returns(tmp_path: Path, tiny_backbone, photo) -> None:
    stored = Preprocessing(CUSTOM, faces="largest", face_margin=0.25).to_metadata()
    loaded = create_model_and_transforms(checkpoint=write(tmp_path / "c.safetensors", tiny_backbone, stored))
    assert loaded.preprocess == Preprocessing(CUSTOM, faces="largest", face_margin=0.25)
    expected = image_transform_v2(PreprocessCfg(**CUSTOM), is_train=False)(photo)
    assert torch.equal(loaded.transform(photo), expected)
    assert not torch.allclose(loaded.transform(photo), tiny_backbone.preprocess(photo))  # not the model default


def test_a_checkpoint_without_stored_preprocessing_keeps_the_old_behaviour(tmp_path: Path, tiny_backbone,
                                                                           photo) -> None:
    """Before it was stored: the backbone's own preprocessing, the task's face mode, the training margin."""
    old = write(tmp_path / "old.safetensors", tiny_backbone, None, train={"config": {"face_margin": 0.7}})
    loaded = create_model_and_transforms(checkpoint=old)
    assert loaded.preprocess.faces == get_task("age").faces == "largest"
    assert loaded.preprocess.face_margin == 0.7
    assert torch.equal(loaded.transform(photo), tiny_backbone.preprocess(photo))
    no_margin = write(tmp_path / "older.safetensors", tiny_backbone, None)
    assert create_model_and_transforms(checkpoint=no_margin).preprocess.face_margin == DEFAULT_MARGIN


def test_a_named_backbone_gets_its_own_preprocessing_and_the_tasks_faces(photo) -> None:
    loaded = create_model_and_transforms(model="numclip-tiny", pretrained="none", task="hci")
    assert loaded.preprocess.faces == "none" and loaded.preprocess.face_margin == DEFAULT_MARGIN
    assert torch.equal(loaded.transform(photo), loaded.backbone.preprocess(photo))
    assert loaded.checkpoint is None and not loaded.model.training


@pytest.mark.parametrize(("change", "words"), [
    ({"image": {**CUSTOM, "mean": ["x", 0, 0]}}, "mean must be three finite numbers"),
    ({"image": {**CUSTOM, "std": [0.1, 0.0, 0.1]}}, "std must be three finite numbers above 0"),
    ({"image": {**CUSTOM, "interpolation": "lanczos"}}, "interpolation must be one of"),
    ({"image": {**CUSTOM, "bpe_path": "/etc/passwd"}}, "preprocess.image must hold"),
    ({"faces": "all"}, "preprocess.faces must be one of"),
    ({"face_margin": float("nan")}, "face_margin must be a number"),
    ({"image": {**CUSTOM, "size": [32, 32]}}, "does not match the image tower's input [64, 64]"),
])
def test_damaged_preprocessing_metadata_is_refused(change: dict, words: str, tmp_path: Path, tiny_backbone) -> None:
    stored = {**Preprocessing(CUSTOM).to_metadata(), **change}
    path = write(tmp_path / "bad.safetensors", tiny_backbone, stored)
    with pytest.raises(CheckpointError) as info:
        create_model_and_transforms(checkpoint=path)
    assert words in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_predict_uses_the_checkpoints_preprocessing(tmp_path: Path, tiny_backbone, synthetic_images,
                                                    run_cli) -> None:
    """Same tensors, different stored preprocessing: predict's numbers change with it."""
    values = []
    for name, image in (("default", {**tiny_backbone.preprocess_cfg}), ("custom", CUSTOM)):
        stored = Preprocessing(image, faces="none").to_metadata()
        path = write(tmp_path / f"{name}.safetensors", tiny_backbone, stored)
        result = run_cli(["predict", *synthetic_images[:3], "--checkpoint", path, "--format", "jsonl"])
        assert result.exit_code == 0, result.stderr
        values.append([json.loads(line)["value"] for line in result.stdout.splitlines()])
    assert values[0] != values[1]


def test_training_records_its_preprocessing(tmp_path: Path, synthetic_dir: Path, run_cli) -> None:
    out = tmp_path / "m.safetensors"
    result = run_cli(["train", "--data", synthetic_dir, "--model", "numclip-tiny", "--pretrained", "none",
                      "--epochs", "1", "--workers", "0", "--freeze-image", "--face-margin", "0.3", "--out", out,
                      "--device", "cpu", "--offline"])
    assert result.exit_code == 0, result.stderr
    stored = Preprocessing.from_metadata(read_checkpoint(out).preprocess)
    assert stored.faces == "none" and stored.face_margin == 0.3
    assert stored.image["size"] == [64, 64] and stored.image["resize_mode"] == "shortest"


def test_a_checkpoint_excludes_model_or_pretrained_options(tmp_path: Path, tiny_backbone) -> None:
    path = write(tmp_path / "c.safetensors", tiny_backbone, None)
    with pytest.raises(UsageError, match="--checkpoint carries its own backbone"):
        create_model_and_transforms(checkpoint=path, pretrained="none")


def test_untagged_backbones_are_checked_for_storage_before_training(tmp_path: Path) -> None:
    """A bundle whose config has tokenizer options could be trained, but its checkpoint never loaded."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                        "tokenizer_kwargs": {"clean": "lower"}}}
    (bundle / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    backbone, _ = open_backbone(f"local-dir:{bundle}", None, init_seed=0)  # predicting with it is fine
    assert backbone.describe()["name"] == "bundle" and str(tmp_path) not in json.dumps(backbone.describe())
    with pytest.raises(UsageError, match="tokenizer_kwargs"):
        open_backbone(f"local-dir:{bundle}", None, for_training=True)


# --- shipped checkpoints by short name ---------------------------------------------------------------------------

def test_a_shipped_checkpoint_resolves_by_name_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  synthetic_images, run_cli) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NUMCLIP_WEIGHTS", raising=False)
    result = run_cli(["predict", synthetic_images[0], "--checkpoint", "numclip-tiny-dots", "--format", "jsonl"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["task"] == "dots"


def test_the_weights_folder_variable_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_backbone,
                                                 synthetic_images, run_cli) -> None:
    """``NUMCLIP_WEIGHTS`` serves installs without the repository's ``weights/`` folder."""
    write(tmp_path / "numclip-tiny-dots.safetensors", tiny_backbone, None)  # an "age" model under the name
    monkeypatch.setenv("NUMCLIP_WEIGHTS", str(tmp_path))
    result = run_cli(["predict", synthetic_images[0], "--checkpoint", "numclip-tiny-dots", "--format", "jsonl"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["task"] == "age"


@pytest.mark.parametrize("name", ["other", "../other", "numclip-tiny-dots/../other"])
def test_only_known_names_are_looked_up(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_backbone,
                                        synthetic_images, run_cli) -> None:
    """A name is matched against the shipped names, never joined into the weights folder's path."""
    folder = tmp_path / "weights" / "inner"
    folder.mkdir(parents=True)
    write(folder / "other.safetensors", tiny_backbone, None)
    write(folder / "other", tiny_backbone, None)
    monkeypatch.setenv("NUMCLIP_WEIGHTS", str(folder))
    monkeypatch.chdir(tmp_path)
    result = run_cli(["predict", synthetic_images[0], "--checkpoint", name])
    assert result.exit_code == 1, result.stderr
    assert f"checkpoint not found: {name}" in result.stderr
    assert ("shipped checkpoint: numclip-tiny-dots" in result.stderr) == (name == "other")


def test_calibrate_never_rewrites_a_shipped_checkpoint(synthetic_dir: Path, run_cli) -> None:
    result = run_cli(["calibrate", "--checkpoint", "numclip-tiny-dots", "--data", synthetic_dir])
    assert result.exit_code == 2 and "--out" in result.stderr


# --- messages and files a newcomer meets -------------------------------------------------------------------------

def test_the_resumable_last_checkpoint_predicts_too(tmp_path: Path, synthetic_dir: Path, synthetic_images,
                                                    run_cli) -> None:
    """``*.last.safetensors`` holds the model (plus optimizer state, which predicting ignores)."""
    out = tmp_path / "m.safetensors"
    trained = run_cli(["train", "--data", synthetic_dir, "--model", "numclip-tiny", "--pretrained", "none",
                       "--epochs", "1", "--workers", "0", "--freeze-image", "--out", out, "--device", "cpu"])
    assert trained.exit_code == 0, trained.stderr
    last = tmp_path / "m.last.safetensors"
    assert any(key.startswith("optim.") for key in read_checkpoint(last).tensors)
    values = []
    for path in (out, last):  # one epoch: the best checkpoint is the last one
        result = run_cli(["predict", *synthetic_images[:3], "--checkpoint", path, "--format", "jsonl"])
        assert result.exit_code == 0, result.stderr
        values.append([json.loads(line)["value"] for line in result.stdout.splitlines()])
    assert values[0] == values[1]


def test_a_backbone_without_pretrained_weights_is_not_blamed_on_the_user(synthetic_images, run_cli) -> None:
    """``--model numclip-tiny`` alone: no warning about a ``--pretrained none`` the user never passed."""
    result = run_cli(["predict", synthetic_images[0], "--model", "numclip-tiny", "--task", "age"])
    assert result.exit_code == 0, result.stderr
    assert "numclip-tiny has no pretrained weights: it is randomly initialised" in result.stderr
    assert "--pretrained" not in result.stderr
    explicit = run_cli(["predict", synthetic_images[0], "--model", "numclip-tiny", "--pretrained", "none",
                        "--task", "age"])
    assert "--pretrained none: numclip-tiny is randomly initialised" in explicit.stderr
