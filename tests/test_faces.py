"""Face detection and cropping (``numclip[face]``): on photos that ship with scikit-image, a synthetic group of
faces, crop geometry, the missing-extra errors, and ``--faces`` through predict and train.

The photos: ``data.astronaut()`` (one frontal face), ``data.coffee()`` (none), and a composite of three copies of
the astronaut's face crop at different sizes on a grey canvas.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data

from numclip_cli import faces
from numclip_cli.errors import TaskSpecError, UsageError
from numclip_cli.faces import Box, FaceCrops, crop, crop_square, detect, face_transform, resolve_mode
from numclip_cli.tasks import get_task, task_from_dict

ASTRONAUT_FACE = Box(177, 66, 95, 95)  # docs/faces.md: frontal cascade, scaleFactor 1.1, minNeighbors 5
# the composite: where each copy of the astronaut's face crop is pasted, and its side (largest first)
PASTES = [((20, 60), 200), ((280, 20), 150), ((480, 150), 110)]
TINY = ["--model", "numclip-tiny", "--pretrained", "none", "--device", "cpu", "--workers", "0", "--offline", "--quiet"]


def iou(a: Box, b: Box) -> float:
    left, top = max(a.x, b.x), max(a.y, b.y)
    right, bottom = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    inter = max(0, right - left) * max(0, bottom - top)
    return inter / (a.area + b.area - inter)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def group(astronaut: Image.Image) -> tuple[Image.Image, list[Box]]:
    """Three faces on a grey canvas, and where each face is (the crop's face box, scaled and moved)."""
    box = detect(astronaut)[0]
    face = crop(astronaut, box)
    canvas = Image.new("RGB", (640, 320), (128, 128, 128))
    expected = []
    for (x, y), side in PASTES:
        canvas.paste(face.resize((side, side), Image.Resampling.BICUBIC), (x, y))
        scale = side / face.width
        left, top, _, _ = crop_square(box, astronaut.size)
        expected.append(Box(round(x + (box.x - left) * scale), round(y + (box.y - top) * scale),
                            round(box.w * scale), round(box.h * scale)))
    return canvas, expected


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, astronaut: Image.Image, group) -> dict[str, str]:
    """The three photos as files, the astronaut at half size (a 48-px face) to keep the CLI runs quick."""
    folder = tmp_path_factory.mktemp("faces")
    images = {"astronaut": astronaut.resize((256, 256), Image.Resampling.BILINEAR), "group": group[0],
              "coffee": Image.fromarray(data.coffee())}
    paths = {}
    for name, image in images.items():
        paths[name] = str(folder / f"{name}.png")
        image.save(paths[name])
    return paths


def records(result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# --- detection ----------------------------------------------------------------------------------------------

def test_astronaut_has_one_face_where_opencv_finds_it(astronaut) -> None:
    boxes = detect(astronaut)
    assert len(boxes) == 1
    assert all(abs(got - want) <= 4 for got, want in zip(boxes[0], ASTRONAUT_FACE, strict=True)), boxes


def test_photo_without_a_face_has_none() -> None:
    assert detect(Image.fromarray(data.coffee())) == []


def test_every_face_of_a_group_is_found_largest_first(group) -> None:
    canvas, expected = group
    boxes = detect(canvas)
    assert len(boxes) == len(PASTES)
    assert all(iou(got, want) > 0.7 for got, want in zip(boxes, expected, strict=True)), (boxes, expected)


def test_boxes_are_in_original_pixels_of_a_large_photo(astronaut) -> None:
    """Detection runs on a copy capped at DETECT_MAX_SIDE; the box comes back in the photo's own pixels."""
    big = astronaut.resize((1600, 1600), Image.Resampling.BILINEAR)
    (box,) = detect(big)
    scaled = Box(*(round(v * 1600 / 512) for v in ASTRONAUT_FACE))
    assert iou(box, scaled) > 0.85, (box, scaled)


# --- views: largest, all, none found ------------------------------------------------------------------------

def test_largest_gives_one_crop_and_all_one_per_face(group) -> None:
    canvas, _ = group
    boxes = detect(canvas)
    largest = FaceCrops("largest", margin=0.4)(canvas)
    every = FaceCrops("all", margin=0.25)(canvas)
    assert [fields for _, fields in largest] == [{"face": {"index": 0, "count": 1, "box": list(boxes[0])}}]
    assert [fields["face"] for _, fields in every] == [{"index": i, "count": len(boxes), "box": list(b)}
                                                       for i, b in enumerate(boxes)]
    assert [view.size for view, _ in every] == [(round(max(b.w, b.h) * 1.5),) * 2 for b in boxes]


def test_no_face_gives_the_whole_image_flagged() -> None:
    coffee = Image.fromarray(data.coffee())
    for mode in ("largest", "all"):
        ((view, fields),) = FaceCrops(mode)(coffee)
        assert view is coffee and fields == {"face": None}


def test_training_transform_sees_the_largest_face(group) -> None:
    canvas, _ = group
    largest = detect(canvas)[0]
    assert face_transform("largest", 0.4, lambda image: image.size)(canvas) == crop(canvas, largest).size
    assert face_transform("none", 0.4, lambda image: image.size)(canvas) == canvas.size


# --- crop geometry ------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.data())
def test_crop_is_a_square_with_margin_inside_the_image(draw) -> None:
    width, height = draw.draw(st.integers(1, 500)), draw.draw(st.integers(1, 500))
    x, y = draw.draw(st.integers(0, width - 1)), draw.draw(st.integers(0, height - 1))
    w, h = draw.draw(st.integers(1, width - x)), draw.draw(st.integers(1, height - y))
    margin = draw.draw(st.floats(0, 2))
    left, top, right, bottom = crop_square(Box(x, y, w, h), (width, height), margin)
    side = right - left
    assert bottom - top == side == min(round(max(w, h) * (1 + 2 * margin)), width, height)
    assert 0 <= left and 0 <= top and right <= width and bottom <= height
    if side >= max(w, h):  # the face fits: it is wholly inside
        assert left <= x and top <= y and x + w <= right and y + h <= bottom


def test_crop_is_centred_away_from_borders_and_slides_at_them() -> None:
    assert crop_square(Box(200, 200, 100, 100), (1000, 800), 0.4) == (160, 160, 340, 340)
    assert crop_square(Box(200, 200, 100, 100), (1000, 800), 0.0) == (200, 200, 300, 300)
    assert crop_square(Box(950, 10, 40, 40), (1000, 800), 0.4) == (928, 0, 1000, 72)  # corner: slid inwards
    assert crop_square(Box(10, 10, 180, 80), (400, 200), 0.4) == (0, 0, 200, 200)  # too big: the shorter side
    image = Image.new("RGB", (1000, 800))
    assert crop(image, Box(950, 10, 40, 40)).size == (72, 72)
    with pytest.raises(UsageError, match="--face-margin"):
        crop_square(Box(0, 0, 10, 10), (100, 100), -0.1)


# --- the optional extra -------------------------------------------------------------------------------------

@pytest.fixture(params=["missing", "opencv5"])
def no_extra(request, monkeypatch) -> str:
    """OpenCV not installed (the import fails), or OpenCV 5 (no CascadeClassifier)."""
    if request.param == "missing":
        monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    else:
        monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="5.0.0"))
    return request.param


def test_asking_for_faces_without_the_extra_is_a_usage_error(no_extra) -> None:
    with pytest.raises(UsageError, match=r"install numclip\[face\]"):
        faces.HaarDetector()
    with pytest.raises(UsageError, match=r"install numclip\[face\]"):
        resolve_mode("all", "none")
    assert resolve_mode("none", "largest") == ("none", None)
    mode, warning = resolve_mode(None, "largest")  # the task's default falls back to whole images
    assert mode == "none" and "numclip[face]" in warning


def test_predict_without_the_extra(no_extra, run_cli, photos) -> None:
    asked = run_cli(["predict", photos["astronaut"], *TINY[:-1], "--task", "age", "--faces", "largest"])
    assert asked.exit_code == 2 and "install numclip[face]" in asked.stderr and asked.stdout == ""
    default = run_cli(["predict", photos["astronaut"], *TINY[:-1], "--task", "age", "--format", "jsonl"])
    (record,) = records(default)
    assert record["status"] == "ok" and "face" not in record
    assert "numclip[face] is not installed: using whole images" in default.stderr


@pytest.mark.parametrize("command", ["train", "predict"])
@pytest.mark.parametrize("margin", ["nan", "inf", "-inf", "-0.1"])
def test_face_margin_must_be_finite_and_not_negative(run_cli, tmp_path: Path, command: str, margin: str) -> None:
    # the input does not exist: a check that ran after parsing would exit 1 (not found), not 2
    where = ["--data", tmp_path / "missing"] if command == "train" else [tmp_path / "missing.png"]
    result = run_cli([command, *where, *TINY, "--faces", "largest", "--face-margin", margin])
    assert result.exit_code == 2, result.output
    assert "--face-margin" in result.stderr and "finite number of at least 0" in result.stderr


def test_unknown_mode_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="choose one of none, largest, all"):
        resolve_mode("both", "none")
    with pytest.raises(UsageError, match="choose one of none, largest$"):
        resolve_mode("all", "none", faces.ONE_VIEW_MODES)


# --- task specs ---------------------------------------------------------------------------------------------

def test_task_spec_sets_the_default_face_mode() -> None:
    assert get_task("age").faces == "largest" and get_task("hci").faces == "none"
    spec = {"name": "t", "prompt": "a {}.", "bins": [{"name": "a", "low": 0, "high": 1},
                                                     {"name": "b", "low": 2, "high": 3}]}
    assert task_from_dict(spec).faces == "none"
    assert task_from_dict({**spec, "faces": "largest"}).faces == "largest"
    with pytest.raises(TaskSpecError, match="field 'faces'"):
        task_from_dict({**spec, "faces": "all"})  # 'all' changes the records per input: explicit only


# --- predict and train end to end ---------------------------------------------------------------------------

def test_predict_faces_all_gives_a_record_per_face_in_input_order(run_cli, photos, group) -> None:
    order = [photos["astronaut"], photos["group"], photos["coffee"], photos["astronaut"]]
    got = records(run_cli(["predict", *order, *TINY, "--task", "age", "--faces", "all", "--format", "jsonl"]))
    assert [r["path"] for r in got] == [order[0], *[order[1]] * 3, order[2], order[3]]
    assert all(r["status"] == "ok" and 0 <= r["value"] <= 100 for r in got)
    assert [r["face"]["index"] if r["face"] else None for r in got] == [0, 0, 1, 2, None, 0]
    boxes = [Box(*r["face"]["box"]) for r in got[1:4]]
    assert all(iou(b, want) > 0.7 for b, want in zip(boxes, group[1], strict=True))
    half = Box(*(round(v / 2) for v in ASTRONAUT_FACE))  # the astronaut file is the 256-px copy
    assert iou(Box(*got[0]["face"]["box"]), half) > 0.7


@pytest.mark.slow
def test_predict_defaults_follow_the_task(run_cli, photos, group) -> None:
    paths = [photos["group"], photos["coffee"]]
    age = records(run_cli(["predict", *paths, *TINY, "--task", "age", "--format", "jsonl"]))
    assert [r["face"]["index"] if r["face"] else None for r in age] == [0, None]  # age: the largest face
    assert iou(Box(*age[0]["face"]["box"]), group[1][0]) > 0.7
    hci = records(run_cli(["predict", *paths, *TINY, "--task", "hci", "--format", "jsonl"]))
    assert all("face" not in r for r in hci)
    whole = records(run_cli(["predict", *paths, *TINY, "--task", "age", "--faces", "none", "--format", "jsonl"]))
    assert [r["path"] for r in whole] == paths and all("face" not in r for r in whole)
    assert age[0]["value"] != whole[0]["value"]  # the crop, not the whole canvas, went through the model
    assert age[1]["value"] == whole[1]["value"]  # no face: the whole image


def test_detection_runs_in_the_decode_workers(tiny_backbone, photos) -> None:
    """A crops callable runs where images are decoded: in the worker processes, not the main one."""
    import torch

    from numclip_cli.model.methods import create_model
    from numclip_cli.predictor import Predictor

    model = create_model("zeroshot", tiny_backbone, get_task("age")).eval()
    paths = [photos["coffee"], photos["astronaut"], photos["coffee"]]
    got = list(Predictor(model, torch.device("cpu")).records(paths, tiny_backbone.preprocess, 2, workers=1,
                                                             crops=_tag_with_pid))
    assert [r["path"] for r in got] == [p for p in paths for _ in range(2)]
    assert [r["view"] for r in got] == [0, 1] * 3
    assert {r["pid"] for r in got} and os.getpid() not in {r["pid"] for r in got}


def _tag_with_pid(image: Image.Image) -> list[tuple[Image.Image, dict[str, Any]]]:
    return [(image, {"view": i, "pid": os.getpid()}) for i in range(2)]


@pytest.mark.slow
def test_train_crops_faces_and_the_checkpoint_remembers(run_cli, photos, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "ages"
    for label, name in [("30", "astronaut"), ("40", "group"), ("50", "astronaut"), ("60", "group")]:
        (root / label).mkdir(parents=True)
        for copy in range(2):
            Image.open(photos[name]).save(root / label / f"{name}{copy}.png")
    crops: list[Box] = []
    real_crop = faces.crop

    def counted_crop(image: Image.Image, box: Box, margin: float) -> Image.Image:
        crops.append(box)
        return real_crop(image, box, margin)

    monkeypatch.setattr(faces, "crop", counted_crop)
    out = tmp_path / "age.safetensors"
    assert run_cli(["train", "--data", root, "--task", "age", *TINY, "--epochs", "1", "--batch-size", "4",
                    "--val-split", "0.25", "--face-margin", "0.3", "--out", out]).exit_code == 0
    assert len(crops) >= 8  # every training and validation image went through the face crop

    from numclip_cli.checkpoint import read_checkpoint

    ckpt = read_checkpoint(out)
    assert ckpt.task.faces == "largest" and ckpt.train["config"]["face_margin"] == 0.3
    (record,) = records(run_cli(["predict", photos["group"], "--checkpoint", out, "--workers", "0", "--quiet",
                                 "--format", "jsonl"]))
    assert record["face"]["index"] == 0  # predict crops the way training did, without being told
    rejected = run_cli(["train", "--data", root, "--task", "age", *TINY, "--faces", "all", "--out", out])
    assert rejected.exit_code == 2 and "choose one of none, largest" in rejected.stderr


def test_boxes_are_in_the_upright_image_of_an_exif_rotated_photo(astronaut, tmp_path: Path) -> None:
    """A phone photo stored sideways with EXIF orientation 6: the box is in the pixels the user sees."""
    from numclip_cli.images import load_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "sideways.jpg"
    astronaut.rotate(90, expand=True).save(path, exif=exif, quality=95)
    upright = load_rgb(path)
    assert upright.size == astronaut.size
    ((_, fields),) = FaceCrops("largest")(upright)
    assert iou(Box(*fields["face"]["box"]), ASTRONAUT_FACE) > 0.8
