"""Checkpoints: safetensors round trips, no unpickling ever, and every broken file gives a one-line error."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from numclip_cli.backbone import load_backbone
from numclip_cli.checkpoint import (
    FORMAT_KEY,
    FORMAT_VERSION,
    Checkpoint,
    model_tensors,
    read_checkpoint,
    write_checkpoint,
)
from numclip_cli.errors import CheckpointError
from numclip_cli.factory import create_model_and_transforms
from numclip_cli.model.methods import METHODS, create_model
from numclip_cli.tasks import get_task

TRAIN_INFO = {"epochs": 0, "data": "none", "numclip": "test"}


def load_model(path: Path):
    """Model, backbone and checkpoint of a file, through the one factory."""
    loaded = create_model_and_transforms(checkpoint=path)
    return loaded.model, loaded.backbone, loaded.checkpoint


def save_model(path: Path, model, backbone, method: str = "numclip") -> Path:
    write_checkpoint(path, Checkpoint(tensors=model_tensors(model, backbone, tuned_image=False), task=model.task,
                                      method=method, backbone=backbone.describe(), train=TRAIN_INFO))
    return path


def outputs(model, images: torch.Tensor):
    with torch.no_grad():
        return model.eval()(images)


@pytest.fixture(scope="module")
def images(tiny_backbone) -> torch.Tensor:
    return torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size,
                       generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def own_backbone(tiny_backbone):
    """A random-init tiny backbone from another seed: the checkpoint must carry it, since loading a
    ``pretrained none`` checkpoint starts from the seed-0 init (``tiny_backbone``) and a load that kept that
    init would otherwise go unnoticed."""
    backbone = load_backbone("numclip-tiny", "none", init_seed=7)
    assert not torch.equal(backbone.model.visual.proj, tiny_backbone.model.visual.proj)
    return backbone


@pytest.fixture(scope="module")
def numclip_model(own_backbone):
    torch.manual_seed(0)
    model = create_model("numclip", own_backbone, get_task("age")).eval()
    with torch.no_grad():  # move the learnable parts off their init so a load that ignores them shows
        for p in [model.prompt.context, model.prompt.words, *model.regressor.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory, numclip_model, own_backbone) -> Path:
    return save_model(tmp_path_factory.mktemp("ckpt") / "model.safetensors", numclip_model, own_backbone)


def test_round_trip_on_random_init_backbone(checkpoint_file: Path, numclip_model, images) -> None:
    """A --pretrained none backbone travels inside the checkpoint; the reloaded model predicts the same."""
    loaded, backbone, ckpt = load_model(checkpoint_file)
    assert ckpt.method == "numclip" and ckpt.task == get_task("age") and ckpt.train == TRAIN_INFO
    assert backbone.name == "numclip-tiny" and backbone.random_init
    assert not loaded.training
    saved = numclip_model.state_dict()
    for key, value in loaded.state_dict().items():  # every tensor arrived, the backbone's included
        assert torch.equal(value, saved[key]), key
    before, after = outputs(numclip_model, images), outputs(loaded, images)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.value, before.value, atol=1e-4, rtol=1e-5)


def test_reloaded_prompts_give_the_saved_text_features(checkpoint_file: Path, numclip_model) -> None:
    """The frozen prompt tokens (SOT, suffix, EOT) must come from the saved text tower, not a fresh one."""
    loaded, _, _ = load_model(checkpoint_file)
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_features(), numclip_model.text_features(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_round_trip_on_a_local_weights_file(tmp_path: Path, tiny_weights_off_init, images, method: str) -> None:
    """File weights travel inside the checkpoint (metadata never names a file) and arrive exactly."""
    weights = tmp_path / "tiny.safetensors"
    trained = tiny_weights_off_init
    save_file(trained, str(weights))
    backbone = load_backbone("numclip-tiny", str(weights))
    model = create_model(method, backbone, get_task("hci")).eval()
    path = save_model(tmp_path / "m.safetensors", model, backbone, method=method)
    weights.unlink()  # the checkpoint must not need the file
    loaded, loaded_backbone, ckpt = load_model(path)
    assert ckpt.backbone["pretrained"] == "stored" and str(tmp_path) not in json.dumps(ckpt.backbone)
    assert ckpt.method == method and loaded_backbone.stored_in_checkpoint
    state = loaded.clip.state_dict()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
    before, after = outputs(model, images), outputs(loaded, images)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.value, before.value, atol=1e-4, rtol=1e-5)


def test_file_is_plain_safetensors_with_json_metadata(checkpoint_file: Path, numclip_model) -> None:
    data = checkpoint_file.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert not data.startswith((b"PK", b"\x80"))  # neither a torch zip nor a pickle stream
    meta = header["__metadata__"]
    assert meta[FORMAT_KEY] == str(FORMAT_VERSION)
    assert meta["method"] == "numclip"
    assert json.loads(meta["task"])["name"] == "age"
    backbone = json.loads(meta["backbone"])
    assert backbone["name"] == "numclip-tiny" and backbone["pretrained"] == "none" and backbone["model_cfg"]
    assert json.loads(meta["train"]) == TRAIN_INFO
    for key in ("prompt.context", "prompt.words", "regressor.offset.weight"):
        assert key in header
    assert any(key.startswith("clip.visual.") for key in header)  # random init: the backbone is stored
    assert not any(key.startswith("prompt.base") or key.startswith("regressor.beta") for key in header)


def test_loading_never_unpickles(monkeypatch: pytest.MonkeyPatch, checkpoint_file: Path, images) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model, _, _ = load_model(checkpoint_file)
    assert outputs(model, images).value.shape == (4,)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path, numclip_model, own_backbone) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"previous")
    save_model(path, numclip_model, own_backbone)
    assert read_checkpoint(path).method == "numclip"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# --- broken files: each is a CheckpointError with a one-line message naming the problem ----------------------

def _rewrite(src: Path, dst: Path, tensors=None, meta=None) -> Path:
    with safe_open(str(src), framework="pt") as handle:
        old_meta = handle.metadata()
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst),
              metadata=meta if meta is not None else old_meta)
    return dst


def _meta(src: Path, **changes: str | None) -> dict[str, str]:
    with safe_open(str(src), framework="pt") as handle:
        meta = dict(handle.metadata())
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


def make_broken(kind: str, good: Path, folder: Path) -> Path:
    """A broken variant of the good checkpoint."""
    path = folder / f"{kind}.safetensors"
    data = good.read_bytes()
    tensors = load_file(str(good))
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-header":
        path.write_bytes(data[:100])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is a text file, not a checkpoint\n")
    elif kind == "torch-zip":
        torch.save(tensors, path)
    elif kind == "unknown-format":
        _rewrite(good, path, meta=_meta(good, numclip__format="99"))
    elif kind == "not-numclip":
        _rewrite(good, path, meta=_meta(good, numclip__format=None))
    elif kind == "wrong-shape":
        tensors["regressor.offset.weight"] = torch.zeros(3, 5)
        _rewrite(good, path, tensors=tensors)
    elif kind == "wrong-backbone-shape":
        tensors["clip.visual.proj"] = torch.zeros(7, 7)
        _rewrite(good, path, tensors=tensors)
    elif kind == "renamed":
        tensors["prompt.ctx"] = tensors.pop("prompt.context")
        _rewrite(good, path, tensors=tensors)
    elif kind == "missing-method-tensor":
        del tensors["regressor.offset.weight"]
        _rewrite(good, path, tensors=tensors)
    elif kind == "missing-backbone-tensor":
        del tensors["clip.visual.proj"]
        _rewrite(good, path, tensors=tensors)
    elif kind == "bad-task":
        _rewrite(good, path, meta=_meta(good, task=json.dumps({"name": "age", "prompt": "no braces"})))
    elif kind == "bad-json":
        _rewrite(good, path, meta=_meta(good, backbone="{not json"))
    elif kind == "unknown-method":
        _rewrite(good, path, meta=_meta(good, method="bogus"))
    elif kind == "empty-backbone":
        _rewrite(good, path, meta=_meta(good, backbone="{}"))
    else:
        raise AssertionError(kind)
    return path


# kind -> words the one-line message must contain
BROKEN = {
    "truncated": ["not a readable safetensors"],
    "truncated-header": ["not a readable safetensors"],
    "empty": ["safetensors"],
    "text": ["not a readable safetensors"],
    "torch-zip": ["not a readable safetensors"],
    "unknown-format": ["'99'", "format"],
    "not-numclip": ["not a numclip checkpoint"],
    "wrong-shape": ["'regressor.offset.weight'", "(3, 5)"],
    "wrong-backbone-shape": ["'clip.visual.proj'", "(7, 7)"],
    "renamed": ["'prompt.ctx'"],
    "missing-method-tensor": ["regressor.offset.weight"],
    "missing-backbone-tensor": ["clip.visual.proj"],
    "bad-task": ["'prompt'"],
    "bad-json": ["metadata"],
    "unknown-method": ["bogus"],
    "empty-backbone": ["backbone"],
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_checkpoint_is_a_one_line_error(kind: str, checkpoint_file: Path, tmp_path: Path) -> None:
    path = make_broken(kind, checkpoint_file, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in BROKEN[kind]:
        assert word in message, f"{kind}: {word!r} not in {message!r}"


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("kind", ["truncated", "text", "torch-zip", "unknown-format", "wrong-shape",
                                  "unknown-method"])
def test_cli_reports_a_broken_checkpoint_in_one_line(kind: str, checkpoint_file: Path, tmp_path: Path,
                                                     synthetic_images, run_cli) -> None:
    path = make_broken(kind, checkpoint_file, tmp_path)
    out = tmp_path / "out.jsonl"
    result = run_cli(["predict", synthetic_images[0], "--checkpoint", path, "--output", out])
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("numclip: error:"), result.stderr
    assert str(path) in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))


def test_cli_predicts_with_a_checkpoint(checkpoint_file: Path, synthetic_images, run_cli) -> None:
    result = run_cli(["predict", *synthetic_images[:3], "--checkpoint", checkpoint_file, "--format", "jsonl"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == synthetic_images[:3]
    assert all(r["status"] == "ok" and r["task"] == "age" for r in records)


def test_cli_rejects_checkpoint_with_model_or_other_task(checkpoint_file: Path, synthetic_images, run_cli) -> None:
    combined = run_cli(["predict", synthetic_images[0], "--checkpoint", checkpoint_file, "--model", "RN50"])
    assert combined.exit_code == 2 and "--checkpoint" in combined.stderr
    other = run_cli(["predict", synthetic_images[0], "--checkpoint", checkpoint_file, "--task", "hci"])
    assert other.exit_code == 2 and "task" in other.stderr


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block blocks, e.g. on opening a FIFO nobody writes to."""
    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("kind", "words"), [("fifo", "is a FIFO (named pipe), not a regular file"),
                                             ("/dev/null", "is a character device, not a regular file"),
                                             ("directory", "is a directory, not a regular file")])
@pytest.mark.parametrize("option", ["--checkpoint", "--pretrained"])
def test_a_checkpoint_or_weights_that_is_not_a_file_says_what_it_is(kind: str, words: str, option: str,
                                                                    tmp_path: Path, synthetic_images,
                                                                    run_cli) -> None:
    """Checked with ``stat`` first: no "not found" for something that exists, and no hang on a FIFO."""
    path = Path(kind) if kind.startswith("/") else tmp_path / "weights.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    args = ["--checkpoint", path] if option == "--checkpoint" else ["--model", "numclip-tiny", "--pretrained", path,
                                                                      "--task", "age"]
    with deadline(30):
        result = run_cli(["predict", synthetic_images[0], *args])
    assert result.exit_code == 1, result.stderr
    assert words in result.stderr and str(path) in result.stderr and "not found" not in result.stderr


def test_format_1_numclip_reads_as_the_reference_design(tmp_path: Path, tiny_backbone, images) -> None:
    """Format 1 called the reference NumCLIP design (adapter + SSR head) "numclip": such a file loads as
    ``numclip-ssr`` and predicts what it predicted; a format-3 "numclip" is the offset-head design."""
    ssr = create_model("numclip-ssr", tiny_backbone, get_task("age")).eval()
    current = save_model(tmp_path / "v2.safetensors", ssr, tiny_backbone, method="numclip-ssr")
    tensors = load_file(str(current))
    with safe_open(str(current), framework="pt") as handle:
        meta = dict(handle.metadata())
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata={**meta, FORMAT_KEY: "1", "method": "numclip"})
    model, _, checkpoint = load_model(old)
    assert checkpoint.method == "numclip-ssr" and model.method == "numclip-ssr"
    torch.testing.assert_close(outputs(model, images).value, outputs(ssr, images).value)
    save_file(tensors, str(old), metadata={**meta, "method": "numclip"})  # format 3: another design's tensors
    with pytest.raises(CheckpointError, match="'adapter.fc.0.weight' does not belong to this model"):
        load_model(old)


def test_format_2_numclip_reads_as_the_position_head(tmp_path: Path, tiny_backbone, images) -> None:
    """Format 2 (numclip 0.2) called the position-head design "numclip": such a file loads as
    ``numclip-position`` and predicts what it predicted, not as the offset head whose tensors it lacks."""
    torch.manual_seed(0)
    position = create_model("numclip-position", tiny_backbone, get_task("age")).eval()
    with torch.no_grad():
        position.regressor.position.weight.normal_()  # a trained-looking head: t ≠ 0
    current = save_model(tmp_path / "v3.safetensors", position, tiny_backbone, method="numclip-position")
    with safe_open(str(current), framework="pt") as handle:
        meta = dict(handle.metadata())
    old = tmp_path / "v2.safetensors"
    save_file(load_file(str(current)), str(old), metadata={**meta, FORMAT_KEY: "2", "method": "numclip"})
    model, _, checkpoint = load_model(old)
    assert checkpoint.method == "numclip-position" and model.method == "numclip-position"
    torch.testing.assert_close(outputs(model, images).value, outputs(position, images).value)
