"""Training data layouts (folder, CSV/TSV, list) and their error reports."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms.functional import to_tensor

from numclip_cli.checkpoint import read_checkpoint
from numclip_cli.datasets import (
    LabelledImages,
    Samples,
    collate_labelled,
    few_shot,
    load_samples,
    split_validation,
    train_transform,
)
from numclip_cli.errors import DataError
from numclip_cli.synthetic import render, task_spec, write_dataset
from numclip_cli.tasks import get_task

HCI = get_task("hci")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(4):
        path = tmp_path / "img" / f"photo {i}.png"  # a space in the name: list rows split on the last field
        path.parent.mkdir(exist_ok=True)
        render("dots", i + 1, seed=i).save(path)
        paths.append(path)
    return paths


def test_folder_per_label_with_bin_names_and_numbers(tmp_path: Path) -> None:
    for folder, label in (("1930s", 1), ("1955", 2), ("1970s", 3)):
        (tmp_path / folder).mkdir()
        render("dots", label, seed=label).save(tmp_path / folder / "a.png")
    samples = load_samples(tmp_path, HCI)
    assert sorted(samples.values) == [1934.5, 1955.0, 1974.5]


def test_csv_tsv_and_list_formats(images: list[Path], tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("path,label\n" + "".join(f"img/{p.name},{1930 + 10 * i}.0\n"
                                                              for i, p in enumerate(images)))
    (tmp_path / "l.tsv").write_text("path\tlabel\n" + "".join(f"img/{p.name}\t1940s\n" for p in images))
    (tmp_path / "l.txt").write_text("# comment\n\n" + "".join(f"img/{p.name} 1961\n" for p in images))
    assert load_samples(tmp_path / "l.csv", HCI).values == [1930.0, 1940.0, 1950.0, 1960.0]
    assert load_samples(tmp_path / "l.tsv", HCI).values == [1944.5] * 4
    listed = load_samples(tmp_path / "l.txt", HCI)
    assert listed.values == [1961.0] * 4 and Path(listed.paths[0]).exists()


def test_problems_are_reported_with_file_and_line(images: list[Path], tmp_path: Path) -> None:
    lines = [f"img/{images[0].name} 1931", "img/missing.png 1940", f"img/{images[1].name} 2020",
             f"img/{images[2].name} nineteen", "lonely"]
    (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_samples(tmp_path / "bad.txt", HCI)
    message = str(info.value)
    assert "4 problem(s)" in message and "\n" not in message
    for line in (2, 3, 4, 5):
        assert f"bad.txt:{line}" in message
    assert "image not found" in message and "outside the task range" in message


def test_names_holding_line_breaks_are_read_as_written(tmp_path: Path) -> None:
    """A quoted CSV field may hold a newline (the csv module's rules, not str.splitlines), and a list line ends
    only at \\r, \\n or \\r\\n: U+2028, NEL and a form feed are characters of the name."""
    names = ["new\nline.png", "sep\u2028arator.png", "nel\x85.png", "form\x0cfeed.png"]
    for i, name in enumerate(names):
        render("dots", i + 1, seed=i).save(tmp_path / name, format="PNG")
    (tmp_path / "newline.png").write_bytes((tmp_path / names[0]).read_bytes())  # what splitting at \n reads
    quoted = "".join(f'"{name}",{1930 + 10 * i}\n' for i, name in enumerate(names))
    (tmp_path / "l.csv").write_text("path,label\r\n" + quoted, newline="")
    table = load_samples(tmp_path / "l.csv", HCI)
    assert [Path(p).name for p in table.paths] == names and table.values == [1930.0, 1940.0, 1950.0, 1960.0]
    (tmp_path / "l.txt").write_text("".join(f"{name} 1961\r\n" for name in names[1:]), newline="")
    assert [Path(p).name for p in load_samples(tmp_path / "l.txt", HCI).paths] == names[1:]


def test_csv_without_header_is_reported(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a.png,3\n")
    with pytest.raises(DataError, match="x.csv:1"):
        load_samples(tmp_path / "x.csv", HCI)


def test_validation_split_is_seeded_and_disjoint(images: list[Path], tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("".join(f"img/{p.name} {1930 + i}\n" for i, p in enumerate(images)))
    samples = load_samples(tmp_path / "l.txt", HCI)
    train, val = split_validation(samples, 0.25, seed=1)
    again, _ = split_validation(samples, 0.25, seed=1)
    assert train.paths == again.paths and len(val) == 1
    assert set(train.paths).isdisjoint(val.paths) and len(train) + len(val) == 4
    with pytest.raises(DataError):
        split_validation(samples, 1.5, seed=1)


def test_unreadable_images_are_skipped_not_replaced(images: list[Path], tmp_path: Path) -> None:
    images[1].write_bytes(b"\x89PNG broken")
    (tmp_path / "l.txt").write_text("".join(f"img/{p.name} {1930 + 10 * i}\n" for i, p in enumerate(images)))
    data = LabelledImages(load_samples(tmp_path / "l.txt", HCI), HCI, transform=to_tensor)
    batch = collate_labelled([data[i] for i in range(4)])
    assert int(batch["skipped"]) == 1
    assert batch["values"].tolist() == [1930.0, 1950.0, 1960.0]  # the label of the broken image is gone too
    assert batch["bins"].tolist() == [0, 2, 3]


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_fuzzed_lists_only_raise_data_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.txt"
    path.write_text(text, encoding="utf-8")
    try:
        load_samples(path, HCI)
    except DataError:
        pass  # the only acceptable failure: anything else (a traceback for the user) fails the test


# ------------------------------------------------------------------- training geometry = predict geometry
def _photos() -> dict[str, Image.Image]:
    """Real photographs: a square one, two landscape ones and a portrait crop of one."""
    from skimage import data

    photos = {name: Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee")}
    photos["portrait"] = photos["coffee"].crop((100, 0, 350, 400))
    return photos


@pytest.fixture(scope="module")
def preprocess_cfg(tiny_backbone) -> dict:
    """The tiny backbone's preprocessing config as a checkpoint stores it (JSON: tuples become lists)."""
    return json.loads(json.dumps(tiny_backbone.preprocess_cfg))


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "portrait"])
def test_training_transform_without_augmentation_is_predicts(tiny_backbone, preprocess_cfg, name: str) -> None:
    photo = _photos()[name]
    assert torch.equal(train_transform(preprocess_cfg, augment=False)(photo), tiny_backbone.preprocess(photo))


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "portrait"])
def test_training_crops_have_predicts_zoom(tiny_backbone, preprocess_cfg, name: str) -> None:
    """Every augmented crop is a window of the image resized exactly as predict resizes it (maybe mirrored):
    the crop only slides along the longer side, it never zooms in."""
    photo = _photos()[name]
    size = tiny_backbone.image_size
    resized = train_transform({**preprocess_cfg, "size": [size, size]}, augment=False).transforms[0](photo)
    full = tiny_backbone.preprocess.transforms[-1](to_tensor(resized))  # normalised, the whole resized image
    torch.manual_seed(0)
    transform = train_transform(preprocess_cfg)
    for _ in range(8):
        crop = transform(photo)
        windows = [full[:, y:y + size, x:x + size] for y in range(full.shape[1] - size + 1)
                   for x in range(full.shape[2] - size + 1)]
        assert any(torch.allclose(crop, w, atol=1e-6) or torch.allclose(crop.flip(-1), w, atol=1e-6)
                   for w in windows), name


# ------------------------------------------------------------------------------------------------ few-shot
def _samples(values: list[float]) -> Samples:
    return Samples([f"img{i}.png" for i in range(len(values))], values, "data")


def test_few_shot_draws_exactly_k_per_rank_and_all_of_a_short_rank() -> None:
    task = task_spec("dots")  # ranks 1..10
    values = [float(v) for v in range(1, 11) for _ in range(6)] + [3.0] * 4  # rank 3 has 10 images
    values = [v for v in values if v != 10.0] + [10.0]  # rank 10 has a single image
    shots, rest, short = few_shot(_samples(values), task, 4, seed=0)
    drawn = Counter(shots.values)
    assert drawn == {**{float(v): 4 for v in range(1, 10)}, 10.0: 1}
    assert short == ["10"]
    assert Counter(rest.values) == Counter(values) - drawn


def test_few_shot_per_bin_for_bin_ranked_tasks() -> None:
    values = [1930.0 + i for i in range(10)] * 3 + [1975.0] * 5  # 1930s and 1970s only
    shots, _, short = few_shot(_samples(values), HCI, 2, seed=1)
    assert sorted(shots.values)[:2] < [1940.0, 1940.0] and len(shots) == 4
    assert Counter(HCI.bin_index(v) for v in shots.values) == {0: 2, 4: 2}
    assert short == ["1940s", "1950s", "1960s"]


def test_few_shot_is_seeded_and_leaves_the_rest_for_validation() -> None:
    task = task_spec("dots")
    samples = _samples([float(1 + i % 10) for i in range(200)])
    first, rest, _ = few_shot(samples, task, 3, seed=5)
    again, _, _ = few_shot(samples, task, 3, seed=5)
    other, _, _ = few_shot(samples, task, 3, seed=6)
    assert first.paths == again.paths and first.paths != other.paths
    assert set(first.paths).isdisjoint(rest.paths) and len(first) + len(rest) == len(samples) == 200
    _, val = split_validation(rest, 0.1, seed=5)
    assert set(val.paths) <= set(rest.paths) and set(val.paths).isdisjoint(first.paths)


def test_train_shots_cli_trains_on_k_per_rank_and_validates_on_the_rest(run_cli, tmp_path: Path) -> None:
    write_dataset("dots", tmp_path / "dots", n=60, seed=0)
    metrics_out, out = tmp_path / "m.json", tmp_path / "m.safetensors"
    result = run_cli(["train", "--data", tmp_path / "dots", "--model", "numclip-tiny", "--pretrained", "none",
                      "--offline", "--device", "cpu", "--shots", "2", "--epochs", "1", "--batch-size", "8",
                      "--val-split", "0.2", "--workers", "0", "--out", out, "--metrics-out", metrics_out])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(metrics_out.read_text())
    assert summary["n_train"] == 20 and summary["n_val"] == round(0.2 * 40)
    data = read_checkpoint(out).train["data"]
    assert "2 per rank" in data["train"]


def test_train_shots_that_take_every_image_say_what_to_do(run_cli, tmp_path: Path) -> None:
    write_dataset("dots", tmp_path / "dots", n=20, seed=0)
    result = run_cli(["train", "--data", tmp_path / "dots", "--model", "numclip-tiny", "--pretrained", "none",
                      "--offline", "--device", "cpu", "--shots", "1000", "--out", tmp_path / "m.safetensors"])
    assert result.exit_code == 1, result.output
    assert "--shots 1000 puts every image" in result.stderr and "give --val DATA or a smaller --shots" in result.stderr
